r"""ZGR ablations on the embedded default (MiniLM, BBC News, 10 Dirichlet(0.5) clients): one table
and plots of accuracy vs round and vs simulated time, every row a real run.

  python -m experiments.ablate_zgr --workdir=workdir/ablate_zgr [--rounds=20] [--only=alpha,m]

fedmezo runs --baseline_rounds (40, the demo's), cooperllm runs --rounds: the table gives the
rounds and simulated seconds each run needs to reach fedmezo's final accuracy and its lead over
fedmezo at equal rounds.

Groups (--only picks some; fedmezo, the plain-ZO baseline, always runs):
  alpha     cooperllm with alpha in {0.75, 0.5, 0.25, 0} and adaptive (alpha = 1 is fedmezo exactly)
  m         pool size m in {1, 2, 4} (alpha 0.5)
  public    the cloud's public data capped at 16 and 48 examples (default: all 112)
  mismatch  the cloud sees only classes 0 and 1 (business, entertainment) of the five
  shuffled  the cloud's public labels permuted: guidance without task signal (a control)
  cloud     cloud_lag=1 (round r guided by round r-1's model) and finetune mode (k AdamW steps)
  baseline  fedmezo at 2x and 4x its tuned rate (is the baseline's rate the limit?)
  downlink  V sent as int8, int4 and ternary codes (system/codec.py) instead of float32
"""

import pathlib
import sys

from absl import app
from absl import flags

from cooperllm_jax.errors import CooperError
from experiments.variants import RECORDED, run_variants, write_report

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs, table and plot.',
                               required=True)
_ROUNDS = flags.DEFINE_integer('rounds', 20, 'Rounds per cooperllm run.')
_BASELINE_ROUNDS = flags.DEFINE_integer('baseline_rounds', 40, 'Rounds per fedmezo run.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 2, 'Evaluate every this many rounds.')
_ONLY = flags.DEFINE_list('only', [], 'Groups to run (default: all).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing run directories.')

COOP = 'cooperllm'
GROUPS = {  # group: {run name: (algorithm, overrides of demo.py's config for it)}
    'alpha': {'alpha=0.75': (COOP, ['zgr.alpha=0.75']), 'alpha=0.5': (COOP, []),
              'alpha=0.25': (COOP, ['zgr.alpha=0.25']), 'alpha=0': (COOP, ['zgr.alpha=0.0']),
              'adaptive': (COOP, ['zgr.adaptive=True'])},
    'baseline': {'fedmezo lr=0.1': ('fedmezo', ['learning_rate=0.1']),
                 'fedmezo lr=0.2': ('fedmezo', ['learning_rate=0.2'])},
    'shuffled': {'shuffled labels': (COOP, ['cloud.shuffle_labels=True'])},
    'mismatch': {'public classes 0,1': (COOP, ['cloud.public_classes=(0, 1)'])},
    'm': {'m=2': (COOP, ['zgr.pool_size=2']), 'm=4': (COOP, ['zgr.pool_size=4'])},
    'public': {'public=16': (COOP, ['cloud.public_examples=16']),
               'public=48': (COOP, ['cloud.public_examples=48'])},
    'cloud': {'cloud_lag=1': (COOP, ['cloud.lag=1']),
              'finetune': (COOP, ['cloud.mode=finetune', 'cloud.batches=4'])},
    'downlink': {f'V {fmt}': (COOP, [f'zgr.guidance_format={fmt}'])
                 for fmt in ('int8', 'int4', 'ternary')},
}


def main(argv):
  del argv
  unknown = sorted(set(_ONLY.value) - set(GROUPS))
  if unknown:
    print(f'error: unknown ablation groups {unknown}; choose from {sorted(GROUPS)}', file=sys.stderr)
    sys.exit(2)
  def common(algorithm):
    rounds = _BASELINE_ROUNDS.value if algorithm == 'fedmezo' else _ROUNDS.value
    return [*RECORDED, f'rounds={rounds}', f'eval_every={_EVAL_EVERY.value}']

  variants = {'fedmezo': ('fedmezo', common('fedmezo'))}
  for group, runs in GROUPS.items():
    if not _ONLY.value or group in _ONLY.value:
      for name, (algorithm, overrides) in runs.items():
        variants[name] = (algorithm, common(algorithm) + overrides)
  root = pathlib.Path(_WORKDIR.value)
  try:
    results = run_variants(root, variants, _OVERWRITE.value)
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(write_report(root, results, 'ZGR ablations', baseline='fedmezo'))


if __name__ == '__main__':
  app.run(main)

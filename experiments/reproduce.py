r"""Runs several algorithms on one config and writes a markdown table and an accuracy-vs-round plot.

  python -m experiments.compare --workdir=workdir/compare \
      --algorithms=cooperllm,fedmezo,fedkseed,decomfl,fwdllm,fedavg_bp --rounds=40

Each algorithm runs `experiments/configs/demo.py:<algorithm>` (its tuned rate) in its own
subdirectory; --set entries (key=value) apply to all of them.
"""

import pathlib
import sys

from absl import app
from absl import flags

from cooperllm_jax.errors import CooperError
from experiments.variants import run_variants, write_report

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs, table and plot.',
                               required=True)
_ALGORITHMS = flags.DEFINE_list('algorithms', 'cooperllm,fedmezo,fedkseed,decomfl,fwdllm,fedavg_bp',
                                'Registered algorithm names.')
_ROUNDS = flags.DEFINE_integer('rounds', None, 'Rounds per run (default: the config\'s).')
_BP_ROUNDS = flags.DEFINE_integer('bp_rounds', None, 'Rounds for fedavg_bp (default: --rounds).')
_OVERRIDES = flags.DEFINE_multi_string('set', [], 'config overrides key=value, e.g. zo.probes=2')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing run directories.')


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value)
  variants = {}
  for name in _ALGORITHMS.value:
    rounds = _BP_ROUNDS.value if name == 'fedavg_bp' and _BP_ROUNDS.value else _ROUNDS.value
    variants[name] = (name, list(_OVERRIDES.value) + ([f'rounds={rounds}'] if rounds else []))
  try:
    results = run_variants(root, variants, _OVERWRITE.value)
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  baseline = 'fedmezo' if 'fedmezo' in results else next(iter(results))
  print(write_report(root, results, baseline, 'test accuracy vs round'))


if __name__ == '__main__':
  app.run(main)

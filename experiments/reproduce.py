r"""The paper's headline table in one command: CooperLLM against the ZO baselines and FedAvg-BP.

  python -m experiments.reproduce --workdir=workdir/reproduce_quick --quick
  python -m experiments.reproduce --workdir=workdir/reproduce

--quick runs every algorithm for 8 rounds (fedavg_bp 4), evaluating every 2nd, so that the whole
table takes a few minutes on 2 CPU cores. The full mode runs the configs' own rounds (cooperllm 20,
the ZO baselines 40, fedavg_bp --bp_rounds=10), evaluating every round so that the time to the
target is resolved. Measured on 2 CPU cores shared with other jobs: full mode 19 min (decomfl, not
in the default list, 4 min more), --quick 7.5 min.

Each algorithm runs `experiments/configs/demo.py:<algorithm>` (its tuned rate) in its own
subdirectory of --workdir (a finished run with the same config is reused), with the committed
table's threefry Gaussian directions (variants.RECORDED); --set entries (key=value) apply to all of
them and come last. --workdir gets table.md / table.json (final accuracy; rounds and simulated
seconds to the target accuracy; speed-up over the best ZO baseline; client memory; bytes per client
and round; simulated and real time), accuracy.png (vs round) and accuracy_vs_time.png (vs simulated
time). The target defaults to the best ZO baseline's final accuracy: how much sooner each
algorithm gets where zeroth-order federated tuning ends up.
"""

import pathlib
import sys

from absl import app
from absl import flags

from cooperllm_jax.errors import ConfigError, CooperError
from experiments.variants import RECORDED, ZO_BASELINES, run_variants, write_report

# (rounds, fedavg_bp rounds, eval_every); rounds None: the config's own.
FULL = (None, 10, 1)
QUICK = (8, 4, 2)

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs, table and plots.',
                               required=True)
_ALGORITHMS = flags.DEFINE_list('algorithms', 'cooperllm,fedmezo,fedkseed,fwdllm,fedavg_bp',
                                'Registered algorithm names (decomfl too).')
_QUICK = flags.DEFINE_bool('quick', False, 'Few rounds: the whole table in minutes on 2 CPU cores.')
_ROUNDS = flags.DEFINE_integer('rounds', None, "Rounds per run but fedavg_bp's (default: the "
                               f"config's; --quick: {QUICK[0]}).")
_BP_ROUNDS = flags.DEFINE_integer('bp_rounds', None, f'Rounds for fedavg_bp (default: {FULL[1]}; '
                                  f'--quick: {QUICK[1]}).')
_TARGET = flags.DEFINE_float('target', None, 'Target test accuracy in (0, 1] (default: the best '
                             'ZO baseline\'s final accuracy).')
_OVERRIDES = flags.DEFINE_multi_string('set', [], 'config overrides key=value, e.g. zo.probes=2')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing run directories.')


def check_flags(algorithms: list[str], target) -> None:
  """Bad flags fail before any run starts, not after an hour of training."""
  from cooperllm_jax import ALGORITHMS  # pylint: disable=g-import-not-at-top
  unknown = [a for a in algorithms if a not in ALGORITHMS]
  if unknown:
    raise ConfigError(f'unknown algorithms {unknown}; choose from {", ".join(ALGORITHMS)}')
  if target is None and not set(algorithms) & set(ZO_BASELINES):
    raise ConfigError(f'no ZO baseline ({", ".join(ZO_BASELINES)}) in --algorithms to take the '
                      'target accuracy from: add one or pass --target')
  if target is not None and not 0 < target <= 1:
    raise ConfigError(f'--target={target} is not an accuracy in (0, 1]')


def main(argv):
  del argv
  rounds, bp_rounds, eval_every = QUICK if _QUICK.value else FULL
  rounds, bp_rounds = _ROUNDS.value or rounds, _BP_ROUNDS.value or bp_rounds
  root = pathlib.Path(_WORKDIR.value)
  variants = {}
  for name in _ALGORITHMS.value:
    n = bp_rounds if name == 'fedavg_bp' else rounds
    variants[name] = (name, [*RECORDED, f'eval_every={eval_every}'] + ([f'rounds={n}'] if n else [])
                      + list(_OVERRIDES.value))
  try:
    check_flags(_ALGORITHMS.value, _TARGET.value)
    results = run_variants(root, variants, _OVERWRITE.value)
    table = write_report(root, results, 'CooperLLM and baselines', target=_TARGET.value)
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(table)


if __name__ == '__main__':
  app.run(main)

r"""Federated fine-tuning entry point.

  python -m experiments.train --config=experiments/configs/demo.py --workdir=workdir/demo
  python -m experiments.train --config=experiments/configs/demo.py:fedkseed --config.rounds=10 ...
  python -m experiments.train --flagfile=experiments/flags/bbc_minilm_fedmezo.flags --workdir=...

Writes metrics.jsonl, TensorBoard events (tb/), accuracy.png and summary.json to the workdir and
ends with one `summary:` line. User errors (bad config values, missing assets, malformed data) print
one `error:` line and exit 2.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cooperllm_jax.errors import CooperError

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/demo.py',
                                          'Path to a config file with get_config().')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, partition and summary.',
                               required=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a non-empty workdir.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar over rounds (stderr).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cooperllm_jax.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  progress = log = None
  if _PROGRESS.value:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = lambda rounds: tqdm.tqdm(rounds, desc='rounds', unit='round', file=sys.stderr)
    log = tqdm.tqdm.write  # log lines above the bar, not through it
  try:
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                                 log=log or print, progress=progress)
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'summary: {summary["algorithm"]} on {summary["dataset"]} with {summary["model"]}: '
        f'test accuracy {summary["accuracy_before"]:.4f} -> {summary["accuracy_after"]:.4f} '
        f'after {summary["rounds"]} rounds ({summary["train_seconds"]:.0f}s on '
        f'{summary["backend"]}); client memory {summary["client_memory_bytes"] / 2**20:.1f} MiB')


if __name__ == '__main__':
  app.run(main)

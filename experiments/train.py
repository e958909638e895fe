r"""Federated fine-tuning entry point.

  python -m experiments.train --config=experiments/configs/demo.py --workdir=workdir/demo
  python -m experiments.train --config=experiments/configs/demo.py:fedkseed --config.rounds=10 ...
  python -m experiments.train --flagfile=experiments/flags/bbc_minilm_fedmezo.flags --workdir=...

Multi-process (docs/scaling.md): --coordinator_address, --num_processes and --process_id start
jax.distributed explicitly; without them a recognized launcher's environment does (SLURM, Open MPI,
GKE TPU, or COOPERLLM_DISTRIBUTED=1; see cooperllm_jax/distributed.py). Only process 0 writes the
workdir and logs.

Writes metrics.jsonl, TensorBoard events (tb/), accuracy.png and summary.json to the workdir and
ends with one `summary:` line. User errors (bad config values, missing assets, malformed data) print
one `error:` line and exit 2. --resume continues an interrupted run from its newest good checkpoint
(config.checkpoint_every > 0); `python -m experiments.replay --workdir=...` audits its ledger.
"""

import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli

with cli.flag_errors():  # it reads the default config's overrides from sys.argv right here
  _CONFIG = config_flags.DEFINE_config_file('config', 'experiments/configs/demo.py',
                                            'Path to a config file with get_config().')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, partition and summary.',
                               required=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a non-empty workdir.')
_RESUME = flags.DEFINE_bool('resume', False, 'Continue the run in the workdir from its newest good '
                            'checkpoint (the training config must be the same).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar over rounds (stderr).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process: host:port of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this process, 0-based.')


def main(argv):
  del argv  # cli.run refuses positional arguments
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  import jax  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import distributed  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.run import train_and_evaluate  # pylint: disable=g-import-not-at-top
  with cli.main_errors():
    # Before anything touches a JAX backend.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    primary = jax.process_index() == 0
    progress, log = None, print
    if not primary:
      log = lambda *_: None
    elif _PROGRESS.value:
      import tqdm  # pylint: disable=g-import-not-at-top
      progress = lambda rounds: tqdm.tqdm(rounds, desc='rounds', unit='round', file=sys.stderr)
      log = tqdm.tqdm.write  # log lines above the bar, not through it
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                                 log=log, progress=progress, resume=_RESUME.value)
  if not primary:
    return
  print(f'summary: {summary["algorithm"]} on {summary["dataset"]} with {summary["model"]}: '
        f'test accuracy {summary["accuracy_before"]:.4f} -> {summary["accuracy_after"]:.4f} '
        f'after {summary["rounds"]} rounds ({summary["train_seconds"]:.0f}s on '
        f'{summary["backend"]}); client memory {summary["client_memory_bytes"] / 2**20:.1f} MiB; '
        f'{summary["sim_time_s"]:.1f}s simulated on {summary["system"]["clients"]}')


if __name__ == '__main__':
  cli.run(main, _CONFIG)

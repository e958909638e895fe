r"""The `cooperllm-train` console script (`python -m experiments.train` in a checkout): one run.

  cooperllm-train --workdir=/tmp/demo                                # the packaged default run
  cooperllm-train --workdir=/tmp/x --config=path/to/config.py:fedkseed --config.rounds=10
  cooperllm-train --flagfile=experiments/flags/bbc_minilm_fedmezo.flags --workdir=...
  cooperllm-train --config.algorithm=fedmezo --print_config          # what would run, nothing run

The default --config is the package's own (cooperllm_jax/configs/default.py), so the command runs
from any directory. Every field of the config can be set as --config.<field>=value; --help lists
them with their meanings, --print_config shows the resolved values. --config.algorithm=X on a config
file whose get_config takes the algorithm (the packaged one does) reads it as <file>:X, so X runs
with its tuned settings either way. Multi-process (docs/scaling.md): --coordinator_address,
--num_processes and --process_id start jax.distributed explicitly; without them a recognized
launcher's environment does (SLURM, Open MPI, GKE TPU, or COOPERLLM_DISTRIBUTED=1; see
cooperllm_jax/distributed.py). Only process 0 writes the workdir and logs.

Writes metrics.jsonl, TensorBoard events (tb/), accuracy.png and summary.json to the workdir, logs
each round through absl logging (stderr) and ends with one `summary:` line on stdout. User errors
(bad config values, sizes the data or model cannot give, missing assets, malformed data, a full
disk) print one `error:` line and exit 2; every check of the config, model and data runs before
the workdir is touched. --resume continues an interrupted run from its newest good checkpoint
(config.checkpoint_every > 0); `python -m experiments.replay --workdir=...` audits its ledger.
Progress bars (over rounds, and the `datasets` library's) show only on a terminal; --noprogress
turns them off there too.
"""

import contextlib
import importlib.util
import inspect
import os
import pathlib
import sys
import textwrap

from absl import flags
from absl import logging
from ml_collections import config_flags

from cooperllm_jax import cli

DEFAULT_CONFIG = str(pathlib.Path(__file__).with_name('configs') / 'default.py')
# What turns off the Hugging Face libraries' progress bars, which they read when imported.
HF_PROGRESS_ENV = ('HF_DATASETS_DISABLE_PROGRESS_BARS', 'HF_HUB_DISABLE_PROGRESS_BARS')

with cli.flag_errors():  # it reads the default config's overrides from sys.argv right here
  _CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG,
                                            'Path to a config file with get_config().')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, partition and summary '
                               '(required, but with --print_config).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a non-empty workdir.')
_RESUME = flags.DEFINE_bool('resume', False, 'Continue the run in the workdir from its newest good '
                            'checkpoint (the training config must be the same).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show progress bars on a terminal (stderr): over '
                              "rounds, and the datasets library's while it reads a local file.")
_PRINT_CONFIG = flags.DEFINE_bool('print_config', False, 'Print the resolved config (every field, '
                                  'defaults filled in) and exit: nothing is run or written.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process: host:port of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this process, 0-based.')


def _usage() -> str:
  """--help: what the command does, its flags, and every config field with its meaning."""
  meanings = cli.config_fields()
  width = max(map(len, meanings)) + 2
  fields = [textwrap.fill(text, 100, initial_indent=f'  {key:<{width}}',
                          subsequent_indent=' ' * (width + 2)) if text else f'  {key}'
            for key, text in meanings.items()]
  return '\n'.join([__doc__.strip(), '', 'flags:',
                    flags.FLAGS.module_help(flags.FLAGS.find_module_defining_flag('workdir')), '',
                    'config fields, each set as --config.<field>=value (--print_config shows their '
                    'values):', *fields])


def _config():
  """The --config's ConfigDict; with --config.algorithm=X, the file's get_config(X) with the
  other overrides applied, where get_config takes an `algorithm` (see the module docstring)."""
  flag = flags.FLAGS['config']
  overrides = config_flags.get_override_values(flag)
  if 'algorithm' not in overrides:
    return flag.value
  # ml_collections passes what follows the path's first ':' to get_config.
  path = config_flags.get_config_filename(flag).split(':', 1)[0]
  spec = importlib.util.spec_from_file_location('cooperllm_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if 'algorithm' not in inspect.signature(module.get_config).parameters:
    return flag.value
  config = module.get_config(overrides['algorithm'])
  config.update_from_flattened_dict(overrides)
  return config


class _AboveBar:
  """A stream for absl's log handler that prints through tqdm.write, so log lines appear above
  the progress bar instead of breaking it."""

  def write(self, text: str) -> None:
    import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.tqdm.write(text, end='', file=sys.stderr)

  def flush(self) -> None:
    sys.stderr.flush()


@contextlib.contextmanager
def _progress_bar(show: bool):
  """(progress, ...): a tqdm wrapper over the rounds with log lines above it, or None."""
  if not show:
    for name in HF_PROGRESS_ENV:
      os.environ[name] = '1'
    yield None
    return
  import tqdm  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler().python_handler
  stream, handler.stream = handler.stream, _AboveBar()
  try:
    yield lambda rounds: tqdm.tqdm(rounds, desc='rounds', unit='round', file=sys.stderr)
  finally:
    handler.stream = stream


def _summary_line(summary: dict) -> str:
  """The run's result in one line (stdout), its divergence guard's rollbacks included."""
  rollbacks = summary['rollbacks']
  return (f'summary: {summary["algorithm"]} on {summary["dataset"]} with {summary["model"]}: '
          f'test accuracy {summary["accuracy_before"]:.4f} -> {summary["accuracy_after"]:.4f} '
          f'after {summary["rounds"]} rounds ({summary["train_seconds"]:.0f}s on '
          f'{summary["backend"]}); client memory {summary["client_memory_bytes"] / 2**20:.1f} MiB; '
          f'{summary["sim_time_s"]:.1f}s simulated on {summary["system"]["clients"]}'
          + (f'; {rollbacks} rollback{"s" * (rollbacks != 1)} by the divergence guard, each '
             'halving the learning rate' if rollbacks else ''))


def _main(argv) -> None:
  del argv  # cli.run refuses positional arguments
  import jax  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import distributed  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.run import train_and_evaluate  # pylint: disable=g-import-not-at-top
  with cli.main_errors():
    config = _config()
    if _PRINT_CONFIG.value:
      for key, value in config_lib.flatten(config_lib.parse(config)).items():
        print(f'{key} = {value!r}')
      return
    if _WORKDIR.value is None:
      cli.fail('--workdir is required: the directory the run writes to')
    # Before anything touches a JAX backend.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    primary = jax.process_index() == 0
    log = logging.info if primary else lambda *_: None
    with _progress_bar(primary and _PROGRESS.value and sys.stderr.isatty()) as progress:
      summary = train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value,
                                   log=log, progress=progress, resume=_RESUME.value)
  if primary:
    print(_summary_line(summary))


def main() -> None:
  """The console script's entry point (pyproject.toml [project.scripts])."""
  cli.run(_main, _CONFIG, _usage)


if __name__ == '__main__':
  main()

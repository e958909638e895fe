"""What the entry points share: every user-facing failure is one `error:` line and exit 2, and
absl logging shows this project's INFO lines but only the warnings of the libraries below it.

absl prints a usage dump and exits 1 on a flag it cannot parse, and ml_collections raises (at
import, when it reads the overrides of the default config, or later, when a --config file that
failed to load is first read) with a traceback. `flag_errors` turns all of these into one line;
`run` is app.run with that parser (and keeps orbax's leftovers of a failed restore from printing
tracebacks), and `main_errors` does the same for CooperErrors and file-system errors in main.
"""

import contextlib
import inspect
import logging as py_logging
import pathlib
import sys
import traceback

from absl import app
from absl import flags
from absl import logging

from cooperllm_jax.errors import CooperError


# Sources whose INFO records are shown: this package and, in a checkout, experiments/.
_OWN = tuple(str(pathlib.Path(__file__).parent.parent / d) for d in ('cooperllm_jax', 'experiments'))


def _own_info(record: py_logging.LogRecord) -> bool:
  """Warnings from anyone, INFO only from our code: orbax logs every checkpoint step at INFO."""
  return record.levelno >= py_logging.WARNING or record.pathname.startswith(_OWN)


def fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _unraisable(unraisable):
  """A restore of a damaged checkpoint fails on its first bad array while orbax's reads of the
  others are still in flight: their coroutines raise again when collected, and their completions
  find orbax's event loop closed ('Event loop is closed'), each printing a traceback at some later
  moment (under a run that went on from an older checkpoint, or after the error line). Those two
  are dropped; anything else is reported as usual."""
  closed = (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == 'Event loop is closed')
  if not (closed or inspect.iscoroutine(unraisable.object)):
    sys.__unraisablehook__(unraisable)


def _describe(e: BaseException) -> str:
  """One line for an error raised while reading flags or loading a config file."""
  if isinstance(e, flags.Error):
    return str(e).strip().splitlines()[0]
  if isinstance(e, (AttributeError, KeyError)):    # an override of a field the config lacks
    field = str(e.args[0] if e.args else e).strip('"')
    return f'the config has no field {field}'
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  if isinstance(e, OSError) and 'config file' in str(e):   # ml_collections' failed --config
    return f'--config: cannot load the config file: {lines[-1]}'
  frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
  where = ('' if isinstance(e, SyntaxError) or not frame   # a SyntaxError names its line
           else f' ({frame.filename}, line {frame.lineno})')
  return f'--config: {type(e).__name__}: {lines[0] if lines else ""}{where}'


@contextlib.contextmanager
def flag_errors():
  """Around flag definitions and parsing: any failure there is the command line's or the config
  file's, so it is reported in one line (a config file may raise anything)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    fail(_describe(e))


@contextlib.contextmanager
def main_errors():
  """Around main's work: CooperErrors and file-system errors (a read-only or full disk, a path
  below a file) are the user's to fix; anything else is a bug and keeps its traceback."""
  try:
    yield
  except CooperError as e:
    fail(str(e))
  except OSError as e:
    fail(f'{e.strerror or e}: {e.filename}' if e.filename else str(e))


def run(main, config_flag=None):
  """app.run(main) with flag errors (and a --config that fails to load) as one line, exit 2, and
  logging at INFO for our code (warnings for the libraries)."""
  def parse(argv):
    with flag_errors():
      rest = flags.FLAGS(argv)
      if config_flag is not None:
        config_flag.value.keys()        # a config that failed to load raises on first access
      if len(rest) > 1:
        raise flags.Error(f'unexpected arguments: {rest[1:]}')
    return rest
  def main_logging(argv):
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_own_info)
    return main(argv)
  sys.unraisablehook = _unraisable
  app.run(main_logging, flags_parser=parse)

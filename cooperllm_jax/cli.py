"""What the entry points share: every user-facing failure is one `error:` line and exit 2, and
absl logging shows this project's INFO lines but only the warnings of the libraries below it.

absl prints a usage dump and exits 1 on a flag it cannot parse, and ml_collections raises (at
import, when it reads the overrides of the default config, or later, when a --config file that
failed to load is first read) with a traceback. `flag_errors` turns all of these into one line;
`run` is app.run with that parser (and keeps orbax's leftovers of a failed restore from printing
tracebacks; a command may print its own --help), and `main_errors` does the same for CooperErrors
and file-system errors in main (a file orbax could not write included).
"""

import contextlib
import difflib
import importlib.util
import inspect
import logging as py_logging
import os
import pathlib
import re
import sys
import traceback
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging

from cooperllm_jax.errors import CooperError


# Sources whose INFO records are shown: this package and, in a checkout, experiments/.
_OWN = tuple(str(pathlib.Path(__file__).parent.parent / d) for d in ('cooperllm_jax', 'experiments'))
_ORBAX = tuple(importlib.util.find_spec('orbax').submodule_search_locations)
# How tensorstore (orbax's array writer) reports a file it could not write: the file and errno.
_STORE_WRITE = re.compile(r'Error writing local file "([^"]+)".*\[os_error_code=\'(\d+)\'\]', re.S)
# absl's help flags, and the -h users type: a command with its own usage prints it for these.
_HELP = ('-h', '-help', '--help', '-?', '-helpshort', '--helpshort')


def _shown(record: py_logging.LogRecord) -> bool:
  """Warnings from anyone, INFO only from our code: orbax logs every checkpoint step at INFO. An
  orbax record with a traceback is a failed write its worker thread logs before the main thread
  raises it, which main_errors reports in one line."""
  if record.exc_info and record.pathname.startswith(_ORBAX):
    return False
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


def _overridden_fields() -> list:
  """The config fields the command line (its flag files included) overrides, as 'zo.eps'."""
  argv = flags.FLAGS.read_flags_from_files(sys.argv[1:], force_gnu=False)
  return [m[1] for m in (re.match(r'-{1,2}(?:no)?config\.([^=]+)', a) for a in argv) if m]


def config_fields() -> dict:
  """{field: its one-line meaning} of every config field as --config.<field> names it, the
  registered algorithms' own sections included (config.field_meanings)."""
  # pylint: disable=g-import-not-at-top,unused-import
  from cooperllm_jax import config as config_lib
  import cooperllm_jax.federated.algorithms  # registers the algorithms and their sections
  return config_lib.field_meanings()


def _missing_field(e: BaseException) -> str:
  """The override of a field the config lacks, with the closest field there is; a field the
  typed config has but the --config file does not set keeps ml_collections' words."""
  known = config_fields()
  unknown = next((f for f in _overridden_fields() if f not in known), None)
  if unknown is None:
    inner = e.args[0] if isinstance(e, AttributeError) and e.args else e
    text = str(inner.args[0] if inner.args else inner)
    return f'the config has no field {text.splitlines()[0]}'
  close = difflib.get_close_matches(unknown, list(known), n=1)
  hint = f'; did you mean --config.{close[0]}?' if close else ''
  return f'--config.{unknown} is not a config field{hint} (--help lists them)'


def _describe(e: BaseException) -> str:
  """One line for an error raised while reading flags or loading a config file."""
  if isinstance(e, flags.Error):
    return str(e).strip().splitlines()[0]
  if isinstance(e, (AttributeError, KeyError)):    # an override of a field the config lacks
    return _missing_field(e)
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
  except ValueError as e:
    written = _STORE_WRITE.search(str(e))
    if written is None:
      raise
    fail(f'{os.strerror(int(written[2]))}: {written[1]}')


def run(main, config_flag=None, usage: Optional[Callable[[], str]] = None):
  """app.run(main) with flag errors (and a --config that fails to load) as one line, exit 2, and
  logging at INFO for our code (warnings for the libraries). usage: the command's own --help text
  (printed instead of absl's, exit 0)."""
  def parse(argv):
    if usage is not None and any(a in _HELP for a in argv[1:]):
      print(usage())
      sys.exit(0)
    with flag_errors():
      rest = flags.FLAGS(argv)
      if config_flag is not None:
        config_flag.value.keys()        # a config that failed to load raises on first access
      if len(rest) > 1:
        raise flags.Error(f'unexpected arguments: {rest[1:]}')
    return rest
  def main_logging(argv):
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_shown)
    return main(argv)
  sys.unraisablehook = _unraisable
  app.run(main_logging, flags_parser=parse)

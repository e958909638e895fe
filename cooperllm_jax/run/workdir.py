"""Run directories: which ones a run may write to, and what --overwrite may delete.

A run marks its directory at creation with MARKER (a JSON file holding a run id). --overwrite
deletes only a marked directory whose entries are all ones a run writes (RUN_ENTRIES); anything
else (a model directory, a user's folder with a config.json of its own, a file dropped into a run)
is refused with a line naming it. The current directory and its parents, the home directory and
the repository are never used as a workdir. Every refusal is a WorkdirError raised before any
model or data is loaded; file-system failures while preparing the directory are WorkdirErrors too.
"""

import json
import os
import pathlib
import shutil
import uuid

from cooperllm_jax.errors import WorkdirError

MARKER = '.cooperllm_run.json'
# Everything a run writes at the top of its workdir (run/loop.py, checkpoint.py, reporting.py).
RUN_ENTRIES = frozenset({MARKER, 'config.json', 'partition.npz', 'metrics.jsonl', 'tb',
                         'accuracy.png', 'summary.json', 'checkpoints', 'ledger',
                         # reporting.write_text's temporary files, left by a killed run
                         '.config.json.tmp', '.metrics.jsonl.tmp', '.summary.json.tmp'})
_REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def _refuse_special(path: pathlib.Path, given) -> None:
  """The directories a run must never take over, whatever they hold."""
  here = pathlib.Path.cwd().resolve()
  if path == here or path in here.parents:
    raise WorkdirError(f'workdir {given!r} is the current directory or one of its parents; '
                       'name a directory of its own')
  if path in (pathlib.Path.home().resolve(), _REPOSITORY):
    raise WorkdirError(f'workdir {given!r} is the home directory or the repository; '
                       'name a directory of its own')


def _first_foreign(path: pathlib.Path):
  """The first entry (sorted) of `path` that is not a run's, or None."""
  return next((p.name for p in sorted(path.iterdir()) if p.name not in RUN_ENTRIES), None)


def check(workdir, overwrite: bool) -> pathlib.Path:
  """The workdir a new run may use (nothing is touched): empty, absent, or with `overwrite` a run
  of ours; inside a writable directory tree."""
  if not str(workdir).strip():
    raise WorkdirError('--workdir is empty')
  path = pathlib.Path(workdir).expanduser()
  resolved = path.resolve()
  _refuse_special(resolved, str(workdir))
  existing = next(p for p in (resolved, *resolved.parents) if p.exists())
  if not existing.is_dir():
    raise WorkdirError(f'workdir {path}: {existing} is a file, not a directory')
  if existing == resolved and any(path.iterdir()):
    if not overwrite:
      raise WorkdirError(f'workdir {path} is not empty; pass --overwrite to replace it')
    if not (path / MARKER).is_file():
      raise WorkdirError(f'workdir {path} was not created by a run (no {MARKER}); refusing to '
                         'delete it even with --overwrite')
    foreign = _first_foreign(path)
    if foreign is not None:
      raise WorkdirError(f'workdir {path} holds {foreign!r}, which no run writes; refusing to '
                         'delete it even with --overwrite')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f'workdir {path}: {existing} is not writable')
  return path


def prepare(path: pathlib.Path) -> pathlib.Path:
  """Empties (of a run's entries only: check() allowed it) or creates the workdir, and marks it."""
  try:
    if path.exists():
      for entry in path.iterdir():
        if entry.name in RUN_ENTRIES and entry.is_dir():
          shutil.rmtree(entry)
        elif entry.name in RUN_ENTRIES:
          entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({'run_id': uuid.uuid4().hex}) + '\n')
  except OSError as e:
    raise WorkdirError(f'cannot prepare workdir {path}: {e.strerror or e}') from None
  return path

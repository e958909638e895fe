"""The processes of a federation by their ids (Linux /proc), without absl flags: the launcher
(local.py) and the tests share them."""

import os
import pathlib

PIDS = 'pids.json'   # {process name: id} in the state dir, while the federation runs


def send(pid: int, sig: int) -> None:
  """Signals a process that may have ended already."""
  try:
    os.kill(pid, sig)
  except ProcessLookupError:
    pass


def descendants(pid: int) -> set:
  """The ids of pid's descendants (Linux /proc)."""
  out, todo = set(), [pid]
  while todo:
    try:
      kids = {int(c) for t in pathlib.Path(f'/proc/{todo.pop()}/task').iterdir()
              for c in (t / 'children').read_text().split()}
    except OSError:
      continue
    todo.extend(kids - out)
    out |= kids
  return out


def reap() -> None:
  """Collects the exit status of orphans this subreaper adopted."""
  try:
    while os.waitpid(-1, os.WNOHANG)[0]:
      pass
  except ChildProcessError:
    pass

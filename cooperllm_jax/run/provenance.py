"""What produced a run, for its summary.json: library versions, the source commit, the devices and
the command line. None where a fact is not known (an installed package has no commit); never an
error, since a run must not fail for want of its provenance."""

import pathlib
import shlex
import subprocess
import sys
from typing import Optional

import jax
import jaxlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent


def git_commit(source: pathlib.Path = PACKAGE_DIR) -> Optional[str]:
  """The commit of the checkout whose top level holds `source`'s package ('-dirty' appended when
  tracked files differ from it); None outside a checkout, or inside someone else's repository
  (a virtualenv's site-packages under a user's project), or without git."""
  def git(*args):
    return subprocess.run(['git', '-C', str(source), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    if pathlib.Path(git('rev-parse', '--show-toplevel')).resolve() != source.parent.resolve():
      return None
    commit = git('rev-parse', 'HEAD')
    dirty = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty else '')


def provenance() -> dict:
  """{jax, jaxlib, git_commit, device_kind, device_count, command} of this process."""
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'git_commit': git_commit(),
          'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
          'command': shlex.join(getattr(sys, 'orig_argv', sys.argv))}

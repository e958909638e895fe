"""Dataset loaders: the real BBC News corpus and local CSV/JSONL/Parquet files, errors included."""

import json

import datasets
import ml_collections
import numpy as np
import pytest

from cooperllm_jax import config as config_lib
from cooperllm_jax.data import sources
from cooperllm_jax.errors import ConfigError, DataError


def _write_csv(path, rows, header='text,label'):
  path.write_text('\n'.join([header, *rows]) + '\n')
  return path


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def _assert_one_line(excinfo, *names):
  message = str(excinfo.value)
  assert '\n' not in message
  for name in names:
    assert name in message, (name, message)


def test_bbc_news_counts_and_determinism():
  ds = sources.load_bbc_news()
  assert len(ds) == 2225 and ds.num_classes == 5
  assert ds.label_names == ('business', 'entertainment', 'politics', 'sports', 'tech')
  assert ds.labels.dtype == np.int32 and ds.labels.shape == (2225,)
  counts = dict(zip(ds.label_names, np.bincount(ds.labels).tolist()))
  assert counts == {'business': 510, 'entertainment': 386, 'politics': 417, 'sports': 511,
                    'tech': 401}
  assert all(t and t == t.strip() for t in ds.texts)
  again = sources.load_dataset('bbcnews')
  assert again.texts == ds.texts
  np.testing.assert_array_equal(again.labels, ds.labels)


def test_csv_string_labels_sorted(tmp_path):
  path = _write_csv(tmp_path / 'news.csv', ['Stocks rise,business', ' Goal! ,sport',
                                            'Shares fall,business'])
  ds = sources.load_dataset(str(path))
  assert ds.name == 'news'
  assert ds.texts == ('Stocks rise', 'Goal!', 'Shares fall')
  assert ds.label_names == ('business', 'sport')
  np.testing.assert_array_equal(ds.labels, [0, 1, 0])
  assert ds.labels.dtype == np.int32


def test_tsv_and_custom_columns(tmp_path):
  path = tmp_path / 'x.tsv'
  path.write_text('body\tcat\nhello, world\t1\nbye\t0\n')
  ds = sources.load_local(path, text_column='body', label_column='cat')
  assert ds.texts == ('hello, world', 'bye')
  assert ds.label_names == ('0', '1')


def test_jsonl_int_labels_default_names(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [{'text': 'a', 'label': 2}, {'text': 'b', 'label': 0}])
  ds = sources.load_local(path)
  assert ds.label_names == ('0', '1', '2')
  np.testing.assert_array_equal(ds.labels, [2, 0])


def test_jsonl_label_names_mapping(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [{'text': 'a', 'label': 'tech'},
                                             {'text': 'b', 'label': 'business'}])
  ds = sources.load_local(path, label_names=['tech', 'politics', 'business'])
  assert ds.label_names == ('tech', 'politics', 'business')
  np.testing.assert_array_equal(ds.labels, [0, 2])
  path = _write_jsonl(tmp_path / 'i.jsonl', [{'text': 'a', 'label': 1}])
  ds = sources.load_local(path, label_names=['neg', 'pos'])
  assert ds.num_classes == 2
  np.testing.assert_array_equal(ds.labels, [1])


def test_parquet(tmp_path):
  pd = pytest.importorskip('pandas')
  path = tmp_path / 'p.parquet'
  pd.DataFrame({'text': ['x', 'y', 'z'], 'label': [1, 0, 1]}).to_parquet(path)
  ds = sources.load_local(path)
  assert ds.texts == ('x', 'y', 'z')
  np.testing.assert_array_equal(ds.labels, [1, 0, 1])


def test_missing_file(tmp_path):
  with pytest.raises(DataError) as e:
    sources.load_local(tmp_path / 'nope.csv')
  _assert_one_line(e, 'nope.csv')
  with pytest.raises(DataError) as e:
    sources.load_dataset(str(tmp_path / 'nope.csv'))
  _assert_one_line(e, 'nope.csv', 'bbcnews')


def test_unknown_suffix(tmp_path):
  path = tmp_path / 'data.xlsx'
  path.write_text('x')
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'data.xlsx', '.xlsx', '.csv', '.jsonl', '.parquet')


@pytest.mark.parametrize('missing', ['text', 'label'])
def test_missing_column(tmp_path, missing):
  header = 'body,label' if missing == 'text' else 'text,cat'
  path = _write_csv(tmp_path / 'd.csv', ['a,1'], header=header)
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.csv', repr(missing), *header.split(','))


def test_empty_text(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [{'text': 'ok', 'label': 'a'},
                                             {'text': ' \n ', 'label': 'a'}])
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.jsonl', 'row 1', 'empty')
  path = _write_csv(tmp_path / 'd.csv', ['ok,a', 'ok,a', ',a'])
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.csv', 'row 2')


def test_null_label(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [{'text': 'a', 'label': 'x'},
                                             {'text': 'b', 'label': None}])
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.jsonl', 'row 1', 'label')
  path = _write_csv(tmp_path / 'd.csv', ['a,1', 'b,'])
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.csv', 'row 1', 'label')


def test_unknown_label_with_label_names(tmp_path):
  path = _write_csv(tmp_path / 'd.csv', ['a,tech', 'b,sport', 'c,weather'])
  with pytest.raises(DataError) as e:
    sources.load_local(path, label_names=['tech', 'sport'])
  _assert_one_line(e, 'd.csv', 'row 2', "'weather'")


def test_int_label_out_of_range(tmp_path):
  path = _write_csv(tmp_path / 'd.csv', ['a,0', 'b,1', 'c,2'])
  with pytest.raises(DataError) as e:
    sources.load_local(path, label_names=['x', 'y'])
  _assert_one_line(e, 'd.csv', 'row 2', 'label 2')


def test_negative_int_label(tmp_path):
  path = _write_csv(tmp_path / 'd.csv', ['a,0', 'b,-1'])
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.csv', 'row 1', 'label -1')


def test_duplicate_label_names(tmp_path):
  path = _write_csv(tmp_path / 'd.csv', ['a,x'])
  with pytest.raises(ConfigError) as e:
    sources.load_local(path, label_names=['x', 'x'])
  _assert_one_line(e, 'label_names')


def test_malformed_file(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"text": "a", "label": 1}\nnot json at all\n')
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.jsonl')


def test_no_rows(tmp_path):
  path = _write_csv(tmp_path / 'd.csv', [])
  with pytest.raises(DataError) as e:
    sources.load_local(path)
  _assert_one_line(e, 'd.csv')


@pytest.mark.parametrize('suffix', ['.csv', '.jsonl', '.parquet'])
def test_run_config_reads_a_local_file_with_its_own_columns_and_label_names(tmp_path, suffix):
  """config.text_column / label_column / label_names reach the loader the run uses (run/task.py
  passes Data.file_options); the defaults pass nothing, so named datasets still load."""
  path = tmp_path / f'reviews{suffix}'
  table = datasets.Dataset.from_dict({'review': ['great film', 'dull plot', 'loved it'],
                                      'stars': ['pos', 'neg', 'pos'], 'id': [1, 2, 3]})
  {'.csv': table.to_csv, '.jsonl': table.to_json, '.parquet': table.to_parquet}[suffix](str(path))
  cfg = config_lib.parse(ml_collections.ConfigDict(
      {'dataset': str(path), 'text_column': 'review', 'label_column': 'stars',
       'label_names': ('pos', 'neg')}))
  ds = sources.load_dataset(cfg.data.dataset, **cfg.data.file_options)
  assert ds.texts == ('great film', 'dull plot', 'loved it')
  assert ds.label_names == ('pos', 'neg')      # the given order, not sorted
  np.testing.assert_array_equal(ds.labels, [0, 1, 0])
  assert config_lib.parse(ml_collections.ConfigDict({})).data.file_options == {}
  with pytest.raises(DataError, match=r"no column 'text' \(text_column\); the columns are "
                                      r"review, stars, id"):
    sources.load_dataset(str(path))

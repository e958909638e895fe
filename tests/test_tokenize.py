"""Tokenization with the real MiniLM tokenizer: padding, parity with AutoTokenizer, suffix, cache."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from cooperllm_jax import assets  # pylint: disable=g-import-not-at-top
from cooperllm_jax.data import default_cache_dir, tokenize_texts  # pylint: disable=g-import-not-at-top
from cooperllm_jax.data import tokenize as tokenize_lib  # pylint: disable=g-import-not-at-top
from cooperllm_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

TEXTS = ['Hello world.', 'Shares in the company rose sharply after the results were announced.',
         'A goal in the final minute won the cup.']
LONG = ' '.join(['the economy grew faster than expected'] * 40)
SUFFIX = '\nTopic:'


@pytest.fixture
def auto_tokenizer():
  # Fresh per test: test_caller_tokenizer_untouched changes the backend tokenizer's settings.
  return transformers.AutoTokenizer.from_pretrained(str(assets.MINILM.path()))


@pytest.fixture
def tok(auto_tokenizer):
  return auto_tokenizer.backend_tokenizer


def test_shapes_dtypes_and_right_padding(tok, tmp_path):
  out = tokenize_texts(tok, TEXTS, max_length=10, pad_id=0, cache_dir=tmp_path)
  assert set(out) == {'input_ids', 'attention_mask', 'length'}
  assert out['input_ids'].shape == out['attention_mask'].shape == (3, 10)
  assert out['length'].shape == (3,)
  assert all(a.dtype == np.int32 for a in out.values())
  for ids, mask, n in zip(out['input_ids'], out['attention_mask'], out['length']):
    np.testing.assert_array_equal(mask, np.arange(10) < n)
    assert np.all(ids[n:] == 0) and np.all(ids[:n] != 0)
  assert out['length'][0] < 10 and out['length'][1] == 10  # short text padded; long truncated.


def test_matches_auto_tokenizer(tok, auto_tokenizer):
  out = tokenize_texts(tok, TEXTS + [LONG], max_length=24, pad_id=-7, cache_dir=False)
  for i, text in enumerate(TEXTS + [LONG]):
    expected = auto_tokenizer(text, truncation=True, max_length=24)['input_ids']
    n = out['length'][i]
    assert out['input_ids'][i, :n].tolist() == expected
    assert np.all(out['input_ids'][i, n:] == -7)


def test_suffix_survives_truncation(tok, auto_tokenizer):
  suffix_ids = auto_tokenizer(SUFFIX, add_special_tokens=False)['input_ids']
  assert suffix_ids
  out = tokenize_texts(tok, [LONG, 'Hi.'], max_length=20, pad_id=0, suffix=SUFFIX, cache_dir=False)
  n_long, n_short = out['length']
  assert n_long == 20
  assert out['input_ids'][0, 20 - len(suffix_ids):].tolist() == suffix_ids
  budget = 20 - len(suffix_ids)
  assert (out['input_ids'][0, :budget].tolist()
          == auto_tokenizer(LONG, truncation=True, max_length=budget)['input_ids'])
  assert n_short < 20
  assert out['input_ids'][1, n_short - len(suffix_ids):n_short].tolist() == suffix_ids
  assert np.all(out['input_ids'][1, n_short:] == 0)


def test_suffix_too_long_for_max_length(tok):
  with pytest.raises(ConfigError, match='max_length=3'):
    tokenize_texts(tok, TEXTS, max_length=3, pad_id=0, suffix=SUFFIX, cache_dir=False)
  with pytest.raises(ConfigError, match='max_length'):
    tokenize_texts(tok, TEXTS, max_length=0, pad_id=0, cache_dir=False)


def test_cache_hit_skips_tokenizing(tok, tmp_path, monkeypatch):
  first = tokenize_texts(tok, TEXTS, max_length=12, pad_id=0, suffix=SUFFIX, cache_dir=tmp_path)
  (cache_file,) = tmp_path.glob('*.npz')
  mtime = cache_file.stat().st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError('re-tokenized despite a cache hit')

  monkeypatch.setattr(tokenize_lib, '_encode', fail)
  second = tokenize_texts(tok, TEXTS, max_length=12, pad_id=0, suffix=SUFFIX, cache_dir=tmp_path)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])
    assert first[key].dtype == second[key].dtype
  assert cache_file.stat().st_mtime_ns == mtime
  with pytest.raises(AssertionError, match='re-tokenized'):  # any changed input misses the cache.
    tokenize_texts(tok, TEXTS, max_length=12, pad_id=0, suffix=None, cache_dir=tmp_path)


def test_corrupt_cache_is_rewritten(tok, tmp_path):
  first = tokenize_texts(tok, TEXTS, max_length=12, pad_id=0, cache_dir=tmp_path)
  (cache_file,) = tmp_path.glob('*.npz')
  cache_file.write_bytes(b'garbage')
  second = tokenize_texts(tok, TEXTS, max_length=12, pad_id=0, cache_dir=tmp_path)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])
  assert cache_file.stat().st_size > len(b'garbage')
  assert [p.name for p in tmp_path.iterdir()] == [cache_file.name]  # no temp file left.


def test_default_cache_dir(tok, tmp_path, monkeypatch):
  monkeypatch.setenv('COOPERLLM_CACHE', str(tmp_path))
  assert default_cache_dir() == tmp_path / 'tokens'
  tokenize_texts(tok, TEXTS[:1], max_length=8, pad_id=0)
  assert len(list((tmp_path / 'tokens').glob('*.npz'))) == 1


def test_caller_tokenizer_untouched(tok, tmp_path):
  tok.enable_truncation(max_length=5)
  tok.enable_padding(length=9, pad_id=3)
  before = tok.to_str()
  truncation, padding = tok.truncation, tok.padding
  out = tokenize_texts(tok, [LONG], max_length=30, pad_id=0, suffix=SUFFIX, cache_dir=tmp_path)
  assert out['length'][0] == 30
  assert tok.to_str() == before
  assert tok.truncation == truncation and tok.padding == padding

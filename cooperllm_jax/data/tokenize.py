"""Tokenizes texts into fixed-length, right-padded numpy arrays, cached on disk.

Takes a `tokenizers.Tokenizer` (an AutoTokenizer's `.backend_tokenizer`) and encodes a private
copy of it, so the caller's padding and truncation settings are never changed.
"""

import hashlib
import os
import pathlib
import zipfile
from typing import Literal, Optional, Sequence, Union

import numpy as np
import tokenizers

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.io import save_npz_atomic

_KEYS = ('input_ids', 'attention_mask', 'length')
_CACHE_VERSION = b'cooperllm-tokens-v1'


def default_cache_dir() -> pathlib.Path:
  """The token cache: $COOPERLLM_CACHE/tokens, by default ~/.cache/cooperllm_jax/tokens."""
  return pathlib.Path(os.environ.get('COOPERLLM_CACHE', '~/.cache/cooperllm_jax')
                      ).expanduser() / 'tokens'


def _cache_key(tokenizer_json: str, max_length: int, pad_id: int, suffix: Optional[str],
               texts: Sequence[str]) -> str:
  """Length-prefixes every field so that no two different inputs hash the same bytes."""
  h = hashlib.sha256(_CACHE_VERSION)
  fields = [tokenizer_json, str(max_length), str(pad_id), repr(suffix), *texts]
  for field in fields:
    data = field.encode('utf-8', 'surrogatepass')
    h.update(len(data).to_bytes(8, 'little'))
    h.update(data)
  return h.hexdigest()


def _read_cache(path: pathlib.Path, n: int, max_length: int) -> Optional[dict[str, np.ndarray]]:
  """Returns the cached arrays, or None if the file is absent, corrupt or of the wrong shape."""
  try:
    with np.load(path, allow_pickle=False) as z:
      out = {k: z[k] for k in _KEYS}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  if (out['input_ids'].shape != (n, max_length) or out['attention_mask'].shape != (n, max_length)
      or out['length'].shape != (n,) or any(a.dtype != np.int32 for a in out.values())):
    return None
  return out


def _write_cache(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Atomic, so readers never see a half-written cache entry."""
  save_npz_atomic(path, arrays)


def _encode(tok: tokenizers.Tokenizer, texts: list[str], max_length: int, pad_id: int,
            suffix_ids: list[int]) -> dict[str, np.ndarray]:
  """Encodes with special tokens, truncating each text so that text + suffix fits max_length."""
  tok.enable_truncation(max_length=max_length - len(suffix_ids))
  input_ids = np.full((len(texts), max_length), pad_id, np.int32)
  length = np.zeros(len(texts), np.int32)
  for i, encoding in enumerate(tok.encode_batch(texts, add_special_tokens=True)):
    ids = encoding.ids + suffix_ids
    input_ids[i, :len(ids)] = ids
    length[i] = len(ids)
  attention_mask = (np.arange(max_length) < length[:, None]).astype(np.int32)
  return {'input_ids': input_ids, 'attention_mask': attention_mask, 'length': length}


def tokenize_texts(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], *, max_length: int,
                   pad_id: int, suffix: Optional[str] = None,
                   cache_dir: Union[str, os.PathLike, None, Literal[False]] = None
                   ) -> dict[str, np.ndarray]:
  """Returns int32 'input_ids' and 'attention_mask' [N, max_length] and 'length' [N].

  Args:
    tokenizer: the model's tokenizer (a copy is used, without its padding and truncation).
    texts: the N texts.
    max_length: the padded length (>= 1); longer texts are truncated to fit with the suffix.
    pad_id: the id filling input_ids past each text's length.
    suffix: a prompt such as '\\nTopic:', appended after the encoded text, special tokens
      included, so it is always the last thing before the padding: a decoder classifies from
      there. None: no suffix.
    cache_dir: the disk cache's folder; None uses `default_cache_dir()`, False disables it.

  Returns:
    {'input_ids', 'attention_mask'}: int32 [N, max_length]; 'length': int32 [N].
  """
  if max_length < 1:
    raise ConfigError(f'max_length must be >= 1, got {max_length}')
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.no_truncation()
  suffix_ids = tok.encode(suffix, add_special_tokens=False).ids if suffix else []
  num_special = tok.num_special_tokens_to_add(False)
  if max_length - len(suffix_ids) <= num_special:
    raise ConfigError(f'max_length={max_length} leaves no room for text next to '
                      f'{num_special} special tokens and the {len(suffix_ids)}-token suffix')
  texts = list(texts)
  if cache_dir is False:
    return _encode(tok, texts, max_length, pad_id, suffix_ids)
  # Keyed on the copy without padding/truncation: those caller settings do not change the output.
  key = _cache_key(tok.to_str(), max_length, pad_id, suffix, texts)
  path = pathlib.Path(default_cache_dir() if cache_dir is None else cache_dir) / f'{key}.npz'
  cached = _read_cache(path, len(texts), max_length)
  if cached is not None:
    return cached
  out = _encode(tok, texts, max_length, pad_id, suffix_ids)
  _write_cache(path, out)
  return out

"""One entry point for pretrained models: a name ('minilm', 'smollm2'), a HF directory or a GGUF file.

Returns the model (pure functions), its params and its tokenizer. Encoders get a fresh
classification head for the task; decoders classify by label words (prompt-based, as MeZO).
"""

import dataclasses
import pathlib
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import assets
from cooperllm_jax.data.tokenize import tokenize_texts
from cooperllm_jax.errors import ConfigError, LoaderError
from cooperllm_jax.models import gguf as gguf_lib
from cooperllm_jax.models import hf
from cooperllm_jax.models.decoder import Decoder
from cooperllm_jax.models.encoder import Encoder
from cooperllm_jax.models.spec import build_params, init_params

Model = Union[Encoder, Decoder]
EMBEDDED = {'minilm': assets.MINILM, 'smollm2': assets.SMOLLM2}
# The files a Hugging Face tokenizer is built from; without any, AutoTokenizer still "succeeds".
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'vocab.json', 'tokenizer.model', 'spiece.model',
                   'sentencepiece.bpe.model')


@dataclasses.dataclass
class Pretrained:
  """A loaded model: its pure functions, params pytree, tokenizer and pad id.

  Attributes:
    model: the Encoder or Decoder (its pure functions and config).
    params: the params pytree, leaves in the load's param_dtype.
    tokenizer: a `tokenizers.Tokenizer`.
    pad_id: the id that pads input_ids.
    source: the path the weights were loaded from.
  """
  model: Model
  params: dict
  tokenizer: object          # a `tokenizers.Tokenizer`
  pad_id: int
  source: str

  @property
  def is_decoder(self) -> bool:
    return isinstance(self.model, Decoder)

  def check_max_length(self, max_length: int) -> None:
    """Positions past the model's table are clamped by XLA's gather (an encoder) or were never
    trained (a decoder's context length): a longer max_length would run on garbage."""
    cfg = self.model.cfg
    usable = cfg.max_positions
    if not self.is_decoder and cfg.family == 'roberta':  # its positions start at pad + 1
      usable -= cfg.pad_token_id + 1
    if max_length > usable:
      raise ConfigError(f'max_length={max_length} exceeds the {usable} positions of {self.source}')

  def tokenize(self, texts: Sequence[str], *, max_length: int,
               suffix: Optional[str] = None) -> dict[str, np.ndarray]:
    """data.tokenize_texts with this model's tokenizer and pad id, after check_max_length: int32
    {input_ids, attention_mask} [N, max_length]. A decoder's `suffix` is the cue its label words
    are scored after (e.g. '\\nTopic:')."""
    self.check_max_length(max_length)
    return tokenize_texts(self.tokenizer, texts, max_length=max_length, pad_id=self.pad_id,
                          suffix=suffix)


def resolve(name_or_path: str) -> pathlib.Path:
  if name_or_path in EMBEDDED:
    return EMBEDDED[name_or_path].path()
  path = pathlib.Path(name_or_path).expanduser()
  if not path.exists():
    raise LoaderError(f'model {name_or_path!r} is neither an embedded name '
                      f'({", ".join(EMBEDDED)}) nor an existing path')
  return path


def check_tokenizer(tok, vocab_size: int, source: str) -> None:
  """A tokenizer that does not belong to the model: ids past the embedding would be clamped
  silently by the lookup, and a far smaller vocabulary (e.g. the special tokens only, which
  transformers builds for a directory without tokenizer files) maps every word to [UNK]."""
  size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
  if size > vocab_size or size < vocab_size // 2:
    raise LoaderError(f'{source}: the tokenizer has {size} token ids, but the model\'s embedding '
                      f'has {vocab_size} rows: tokenizer and model do not match')


def _hf_config(path: pathlib.Path, build, hf_cfg: dict, **kw):
  """build(hf_cfg, **kw) (hf.encoder_config or decoder_config), with a missing or inconsistent
  field of config.json as a LoaderError."""
  try:
    return build(hf_cfg, **kw)
  except KeyError as e:
    raise LoaderError(f'{path / "config.json"}: no field {e.args[0]!r}') from None
  except (TypeError, ValueError) as e:
    raise LoaderError(f'{path / "config.json"}: {e}') from None


def label_token_ids(tokenizer, words: Sequence[str]) -> tuple[int, ...]:
  """The first BPE token of ' word' for each label word (MeZO's verbalizer); must be distinct."""
  ids = []
  for w in words:
    enc = tokenizer.encode(' ' + w.strip(), add_special_tokens=False).ids
    if not enc:
      raise ConfigError(f'label word {w!r} encodes to no token')
    ids.append(enc[0])
  if len(set(ids)) != len(ids):
    raise ConfigError(f'label words {list(words)} do not start with distinct tokens')
  return tuple(ids)


def load_pretrained(name_or_path: str, *, num_labels: int = 2,
                    label_words: Optional[Sequence[str]] = None, dtype: str = 'float32',
                    param_dtype: str = 'float32', pooling: str = 'mean',
                    seed: int = 0) -> Pretrained:
  """Loads weights and tokenizer; `num_labels`/`pooling` shape encoder heads, `label_words`
  decoders.

  Args:
    name_or_path: an embedded model's name ('minilm', 'smollm2'), a Hugging Face model
      directory or a .gguf file.
    num_labels: an encoder's number of classes (its head's width).
    label_words: a decoder's class words; each class is scored by its word's token.
    dtype: the compute dtype.
    param_dtype: the params' dtype.
    pooling: an encoder head's pooling (e.g. 'mean').
    seed: seed of the freshly initialized encoder head.

  Returns:
    The Pretrained model.
  """
  path = resolve(name_or_path)
  pdtype = jnp.dtype(param_dtype)
  if path.is_file() and path.suffix == '.gguf':
    f = gguf_lib.GGUFFile(path)
    cfg = gguf_lib.decoder_config(f, dtype=dtype, param_dtype=param_dtype)  # checks the arch first
    tok = gguf_lib.tokenizer(f)
    if label_words:
      cfg = dataclasses.replace(cfg, label_token_ids=label_token_ids(tok, tuple(label_words)))
    check_tokenizer(tok, cfg.vocab_size, str(path))
    model = Decoder(cfg)
    params = build_params(model.specs(), gguf_lib.make_fetch(f, cfg), str(path), pdtype)
    return Pretrained(model, params, tok, cfg.pad_token_id, str(path))
  if not path.is_dir():
    raise LoaderError(f'{path}: expected a Hugging Face model directory or a .gguf file')
  hf_cfg = hf.read_config(path)
  kind = hf.model_type(path, hf_cfg)
  tok, pad_id = hf_tokenizer(path)
  if kind in hf.DECODER_TYPES:
    words = tuple(label_words or ())
    cfg = _hf_config(path, hf.decoder_config, hf_cfg, dtype=dtype, param_dtype=param_dtype,
                     label_token_ids=label_token_ids(tok, words) if words else ())
    check_tokenizer(tok, cfg.vocab_size, str(path))
    model = Decoder(cfg)
    store, table = hf.decoder_checkpoint(path)
    params = build_params(model.specs(), hf.make_fetch(table, store.get, cfg.num_layers, str(path)),
                          str(path), pdtype)
    return Pretrained(model, params, tok, pad_id, str(path))
  cfg = _hf_config(path, hf.encoder_config, hf_cfg, num_labels=num_labels, pooling=pooling,
                   dtype=dtype, param_dtype=param_dtype)
  check_tokenizer(tok, cfg.vocab_size, str(path))
  model = Encoder(cfg)
  specs = model.specs()
  store, table = hf.encoder_checkpoint(path, cfg.family)
  fetch = hf.make_fetch(table, store.get, cfg.num_layers, str(path))
  backbone = {k: v for k, v in specs.items() if k != 'head'}
  params = build_params(backbone, fetch, str(path), pdtype)
  head = dict(specs['head'])
  params['head'] = {}
  if 'pooler' in head:
    params['head']['pooler'] = build_params(head.pop('pooler'), lambda p, s: fetch('head/pooler/' + p, s),
                                            str(path), pdtype)
  params['head'].update(init_params(head, jax.random.key(seed), pdtype))
  return Pretrained(model, params, tok, pad_id, str(path))


def hf_tokenizer(path: pathlib.Path):
  """The directory's fast tokenizer (transformers' AutoTokenizer, files only) and its pad id."""
  import os  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  if not any((path / name).is_file() for name in TOKENIZER_FILES):
    raise LoaderError(f'{path}: no tokenizer files (none of {", ".join(TOKENIZER_FILES)}); '
                      'copy the model\'s tokenizer next to its weights')
  try:
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise LoaderError(f'{path}: no usable tokenizer files ({str(e).splitlines()[0]})') from None
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  backend = tok.backend_tokenizer
  backend.no_padding()    # tokenizer.json may carry a fixed padding/truncation; data/ decides both
  backend.no_truncation()
  return backend, int(pad or 0)

"""Load a LLaMA-architecture GGUF file: config from metadata, dequantized weights, BPE tokenizer.

Weights are dequantized with `gguf.quants.dequantize` (Q4_0, Q4_1, Q8_0, F16, F32, ...). Two traps:
llama.cpp's converter permutes the rows of attn_q / attn_k for its interleaved RoPE layout (we
undo it, back to HF's rotate-half layout), and tied models have no `output.weight` tensor.
"""

import pathlib

import numpy as np

from cooperllm_jax.errors import LoaderError
from cooperllm_jax.models.decoder import DecoderConfig
from cooperllm_jax.models.hf import check_shape

SUPPORTED_ARCHS = ('llama',)
SUPPORTED_TYPES = ('F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q4_K', 'Q6_K')


class GGUFFile:
  """A parsed GGUF file with name -> tensor lookup and typed metadata access."""

  def __init__(self, path):
    import gguf  # pylint: disable=g-import-not-at-top
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise LoaderError(f'{self.path}: no such GGUF file')
    try:
      self.reader = gguf.GGUFReader(str(self.path))
    except Exception as e:  # the reader raises ValueError/struct.error on corrupt files
      raise LoaderError(f'{self.path}: not a readable GGUF file ({e})') from None
    self.tensors = {t.name: t for t in self.reader.tensors}

  def meta(self, key: str, default=...):
    field = self.reader.fields.get(key)
    if field is None:
      if default is ...:
        raise LoaderError(f'{self.path}: missing metadata {key!r}')
      return default
    return field.contents()

  def get(self, name: str) -> np.ndarray:
    """The tensor dequantized to float32 in numpy (row-major, torch layout: [out, in])."""
    import gguf  # pylint: disable=g-import-not-at-top
    t = self.tensors.get(name)
    if t is None:
      raise LoaderError(f'{self.path}: missing tensor {name!r}')
    if t.tensor_type.name not in SUPPORTED_TYPES:
      raise LoaderError(f'{self.path}: tensor {name!r} has unsupported type {t.tensor_type.name}')
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)


def decoder_config(f: GGUFFile, **overrides) -> DecoderConfig:
  arch = f.meta('general.architecture')
  if arch not in SUPPORTED_ARCHS:
    raise LoaderError(f'{f.path}: architecture {arch!r} is not supported ({SUPPORTED_ARCHS})')
  heads = int(f.meta(f'{arch}.attention.head_count'))
  hidden = int(f.meta(f'{arch}.embedding_length'))
  vocab = f.meta(f'{arch}.vocab_size', None) or len(f.meta('tokenizer.ggml.tokens'))
  kw = dict(vocab_size=int(vocab), hidden_size=hidden, num_layers=int(f.meta(f'{arch}.block_count')),
            num_heads=heads, num_kv_heads=int(f.meta(f'{arch}.attention.head_count_kv', heads)),
            head_dim=int(f.meta(f'{arch}.rope.dimension_count', hidden // heads)),
            intermediate_size=int(f.meta(f'{arch}.feed_forward_length')),
            rope_theta=float(f.meta(f'{arch}.rope.freq_base', 10000.0)),
            rms_norm_eps=float(f.meta(f'{arch}.attention.layer_norm_rms_epsilon')),
            tie_embeddings='output.weight' not in f.tensors,
            max_positions=int(f.meta(f'{arch}.context_length', 4096)),
            bos_token_id=f.meta('tokenizer.ggml.bos_token_id', None),
            eos_token_id=f.meta('tokenizer.ggml.eos_token_id', None),
            pad_token_id=int(f.meta('tokenizer.ggml.padding_token_id',
                                    f.meta('tokenizer.ggml.eos_token_id', 0))))
  kw.update(overrides)
  return DecoderConfig(**kw)


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's per-head row interleave of Q/K projections ([out, in] layout)."""
  return (w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def make_fetch(f: GGUFFile, cfg: DecoderConfig):
  """fetch(path, spec) for spec.build_params, in our [in, out] kernel layout."""
  blk = {'attn_norm/scale': 'attn_norm.weight', 'mlp_norm/scale': 'ffn_norm.weight',
         'attn/q/kernel': 'attn_q.weight', 'attn/k/kernel': 'attn_k.weight',
         'attn/v/kernel': 'attn_v.weight', 'attn/o/kernel': 'attn_output.weight',
         'attn/q/bias': 'attn_q.bias', 'attn/k/bias': 'attn_k.bias', 'attn/v/bias': 'attn_v.bias',
         'mlp/gate/kernel': 'ffn_gate.weight', 'mlp/up/kernel': 'ffn_up.weight',
         'mlp/down/kernel': 'ffn_down.weight'}
  top = {'embed/token': 'token_embd.weight', 'final_norm/scale': 'output_norm.weight',
         'lm_head/kernel': 'output.weight'}
  heads = {'layers/attn/q/kernel': cfg.num_heads, 'layers/attn/k/kernel': cfg.num_kv_heads,
           'layers/attn/q/bias': cfg.num_heads, 'layers/attn/k/bias': cfg.num_kv_heads}

  def one(path: str, name: str, shape) -> np.ndarray:
    # Checked before un-permuting and stacking, which would fail on a bad shape without naming it.
    w = check_shape(str(f.path), name, path, f.get(name), shape)
    if path in heads:
      w = unpermute_rope_rows(w, heads[path])
    return w.T if path.endswith('kernel') else w

  def fetch(path: str, spec) -> np.ndarray:
    if path.startswith('layers/'):
      sub = path[len('layers/'):]
      if sub not in blk:
        raise LoaderError(f'no GGUF mapping for parameter {path!r}')
      return np.stack([one(path, f'blk.{i}.{blk[sub]}', spec.shape[1:])
                       for i in range(cfg.num_layers)])
    if path not in top:
      raise LoaderError(f'no GGUF mapping for parameter {path!r}')
    return one(path, top[path], spec.shape)

  return fetch


# llama.cpp pre-tokenizer names -> regexes applied before byte-level BPE.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                   r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer(f: GGUFFile):
  """Builds the GGUF's own byte-level BPE tokenizer (vocab + merges) with the `tokenizers` library."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top,g-multiple-import
  kind = f.meta('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise LoaderError(f'{f.path}: tokenizer model {kind!r} is not supported (byte-level BPE "gpt2")')
  tokens = list(f.meta('tokenizer.ggml.tokens'))
  merges = [tuple(m.split(' ', 1)) for m in f.meta('tokenizer.ggml.merges')]
  types = list(f.meta('tokenizer.ggml.token_type', [1] * len(tokens)))
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                             ignore_merges=False, fuse_unk=False))
  pre = f.meta('tokenizer.ggml.pre', 'default')
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  if pre in ('llama-bpe', 'llama3'):
    split = pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior='isolated')
  else:  # 'gpt2', 'smollm', 'default' and friends use the GPT-2 pattern
    split = pre_tokenizers.Split(Regex(_GPT2_PATTERN), behavior='isolated')
  tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
  tok.decoder = decoders.ByteLevel()
  special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
  bos = f.meta('tokenizer.ggml.bos_token_id', None)
  if f.meta('tokenizer.ggml.add_bos_token', False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f'{tokens[bos]} $A', pair=f'{tokens[bos]} $A $B', special_tokens=[(tokens[bos], bos)])
  return tok

"""Load a local Hugging Face model directory: config.json + model.safetensors (or a sharded index).

Maps the checkpoint's tensor names onto our spec tables (torch Linear weights [out, in] become our
kernels [in, out]; per-layer tensors are stacked for lax.scan). A missing or mis-shaped tensor is a
LoaderError naming it. Heads are task-specific and freshly initialized by the caller.
"""

import json
import pathlib
from typing import Callable, Optional

import numpy as np

from cooperllm_jax.errors import LoaderError
from cooperllm_jax.models.decoder import DecoderConfig
from cooperllm_jax.models.encoder import EncoderConfig

ENCODER_TYPES = ('bert', 'roberta', 'distilbert')
DECODER_TYPES = ('llama', 'mistral', 'qwen2')


class SafetensorsDir:
  """Lazy tensor access across one or more safetensors shards, as float32 numpy arrays."""

  def __init__(self, directory: pathlib.Path):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self.directory = directory
    index = directory / 'model.safetensors.index.json'
    single = directory / 'model.safetensors'
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise LoaderError(f'{index}: not a safetensors index ({e})') from None
      files = sorted(set(weight_map.values()))
    elif single.exists():
      files, weight_map = [single.name], None
    else:
      raise LoaderError(f'{directory}: no model.safetensors or model.safetensors.index.json')
    self._handles = {}
    for name in files:
      path = directory / name
      if not path.exists():
        raise LoaderError(f'{index}: shard {name} is missing')
      try:
        self._handles[name] = safe_open(str(path), framework='flax')
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise LoaderError(f'{path}: unreadable safetensors file ({e})') from None
    self._where = weight_map or {k: files[0] for k in self._handles[files[0]].keys()}

  def keys(self):
    return self._where.keys()

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise LoaderError(f'{self.directory}: missing tensor {name!r}')
    return np.asarray(self._handles[self._where[name]].get_tensor(name), dtype=np.float32)


def read_config(directory: pathlib.Path) -> dict:
  path = directory / 'config.json'
  if not path.exists():
    raise LoaderError(f'{directory}: no config.json (not a Hugging Face model directory)')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise LoaderError(f'{path}: invalid JSON ({e})') from None


def encoder_config(hf: dict, **overrides) -> EncoderConfig:
  kind = hf.get('model_type')
  if kind == 'distilbert':
    kw = dict(family='distilbert', vocab_size=hf['vocab_size'], hidden_size=hf['dim'],
              num_layers=hf['n_layers'], num_heads=hf['n_heads'], intermediate_size=hf['hidden_dim'],
              max_positions=hf['max_position_embeddings'], type_vocab_size=0, layer_norm_eps=1e-12,
              hidden_act=hf.get('activation', 'gelu'), pad_token_id=hf.get('pad_token_id', 0))
  else:
    kw = dict(family=kind, vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
              num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
              intermediate_size=hf['intermediate_size'],
              max_positions=hf['max_position_embeddings'],
              type_vocab_size=hf.get('type_vocab_size', 2),
              layer_norm_eps=hf.get('layer_norm_eps', 1e-12), hidden_act=hf.get('hidden_act', 'gelu'),
              pad_token_id=hf.get('pad_token_id', 0) or 0)
  kw.update(overrides)
  return EncoderConfig(**kw)


def decoder_config(hf: dict, **overrides) -> DecoderConfig:
  heads = hf['num_attention_heads']
  rope = hf.get('rope_parameters') or {}
  kw = dict(vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
            num_layers=hf['num_hidden_layers'], num_heads=heads,
            num_kv_heads=hf.get('num_key_value_heads') or heads,
            head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
            intermediate_size=hf['intermediate_size'],
            rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
            rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
            tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
            attention_bias=hf['model_type'] == 'qwen2' or bool(hf.get('attention_bias', False)),
            max_positions=hf.get('max_position_embeddings', 4096),
            hidden_act=hf.get('hidden_act', 'silu'),
            bos_token_id=hf.get('bos_token_id'), eos_token_id=_first(hf.get('eos_token_id')),
            pad_token_id=_first(hf.get('pad_token_id')) or _first(hf.get('eos_token_id')) or 0)
  kw.update(overrides)
  return DecoderConfig(**kw)


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


# Our parameter path -> checkpoint name template ('{i}' = layer) per family. Kernels are transposed.
def _bert_names(prefix: str, family: str) -> dict[str, str]:
  if family == 'distilbert':
    e, l = f'{prefix}embeddings.', f'{prefix}transformer.layer.{{i}}.'
    names = {'attn/q': 'attention.q_lin', 'attn/k': 'attention.k_lin', 'attn/v': 'attention.v_lin',
             'attn/o': 'attention.out_lin', 'attn_norm': 'sa_layer_norm', 'mlp/up': 'ffn.lin1',
             'mlp/down': 'ffn.lin2', 'mlp_norm': 'output_layer_norm'}
  else:
    e, l = f'{prefix}embeddings.', f'{prefix}encoder.layer.{{i}}.'
    names = {'attn/q': 'attention.self.query', 'attn/k': 'attention.self.key',
             'attn/v': 'attention.self.value', 'attn/o': 'attention.output.dense',
             'attn_norm': 'attention.output.LayerNorm', 'mlp/up': 'intermediate.dense',
             'mlp/down': 'output.dense', 'mlp_norm': 'output.LayerNorm'}
  table = {'embed/token': e + 'word_embeddings.weight',
           'embed/position': e + 'position_embeddings.weight',
           'embed/type': e + 'token_type_embeddings.weight',
           'embed/norm/scale': e + 'LayerNorm.weight', 'embed/norm/bias': e + 'LayerNorm.bias',
           'head/pooler/kernel': f'{prefix}pooler.dense.weight',
           'head/pooler/bias': f'{prefix}pooler.dense.bias'}
  for ours, theirs in names.items():
    if ours.endswith('norm'):
      table[f'layers/{ours}/scale'] = l + theirs + '.weight'
      table[f'layers/{ours}/bias'] = l + theirs + '.bias'
    else:
      table[f'layers/{ours}/kernel'] = l + theirs + '.weight'
      table[f'layers/{ours}/bias'] = l + theirs + '.bias'
  return table


def _llama_names(prefix: str) -> dict[str, str]:
  l = f'{prefix}layers.{{i}}.'
  table = {'embed/token': f'{prefix}embed_tokens.weight', 'final_norm/scale': f'{prefix}norm.weight',
           'lm_head/kernel': 'lm_head.weight',
           'layers/attn_norm/scale': l + 'input_layernorm.weight',
           'layers/mlp_norm/scale': l + 'post_attention_layernorm.weight'}
  for ours, theirs in {'attn/q': 'self_attn.q_proj', 'attn/k': 'self_attn.k_proj',
                       'attn/v': 'self_attn.v_proj', 'attn/o': 'self_attn.o_proj',
                       'mlp/gate': 'mlp.gate_proj', 'mlp/up': 'mlp.up_proj',
                       'mlp/down': 'mlp.down_proj'}.items():
    table[f'layers/{ours}/kernel'] = l + theirs + '.weight'
    table[f'layers/{ours}/bias'] = l + theirs + '.bias'
  return table


def _detect_prefix(store: SafetensorsDir, probe: str, prefixes) -> str:
  for prefix in prefixes:
    if prefix + probe in store:
      return prefix
  raise LoaderError(f'{store.directory}: missing tensor {probe!r} (tried prefixes {list(prefixes)})')


def check_shape(source: str, name: str, path: str, w: np.ndarray, shape) -> np.ndarray:
  """Returns tensor `name` (file layout: [out, in] kernels) if it fits our `path` of `shape`."""
  want = tuple(shape[::-1]) if path.endswith('kernel') else tuple(shape)
  if tuple(w.shape) != want:
    raise LoaderError(f'{source}: tensor {name!r} for {path!r} has shape {tuple(w.shape)}, '
                      f'expected {want}')
  return w


def make_fetch(table: dict[str, str], get: Callable[[str], np.ndarray], num_layers: int,
               source: str):
  """fetch(path, spec) for spec.build_params: stacks per-layer tensors and transposes kernels.

  Shapes are checked per tensor, so one mis-shaped layer is named (not a bare np.stack error).
  """

  def fetch(path: str, spec) -> np.ndarray:
    if path not in table:
      raise LoaderError(f'no checkpoint mapping for parameter {path!r}')
    template = table[path]

    def load(name, shape):
      w = check_shape(source, name, path, get(name), shape)
      return w.T if path.endswith('kernel') else w

    if path.startswith('layers/'):
      return np.stack([load(template.format(i=i), spec.shape[1:]) for i in range(num_layers)])
    return load(template, spec.shape)

  return fetch


def encoder_checkpoint(directory: pathlib.Path, family: str):
  store = SafetensorsDir(directory)
  prefix = _detect_prefix(store, 'embeddings.word_embeddings.weight',
                          ('', f'{family}.', 'bert.', 'model.'))
  return store, _bert_names(prefix, family)


def decoder_checkpoint(directory: pathlib.Path):
  store = SafetensorsDir(directory)
  prefix = _detect_prefix(store, 'embed_tokens.weight', ('model.', ''))
  return store, _llama_names(prefix)


def model_type(directory: pathlib.Path, hf: Optional[dict] = None) -> str:
  kind = (hf or read_config(directory)).get('model_type')
  if kind not in ENCODER_TYPES + DECODER_TYPES:
    raise LoaderError(f'{directory}: model_type {kind!r} is not supported '
                      f'(encoders: {", ".join(ENCODER_TYPES)}; decoders: {", ".join(DECODER_TYPES)})')
  return kind

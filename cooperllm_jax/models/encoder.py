"""BERT-family encoder (BERT, RoBERTa, DistilBERT, MiniLM) with a sequence-classification head.

Post-LayerNorm transformer; layers stacked on a leading axis and run under lax.scan. Batches are
dicts of int arrays: input_ids [B, T], attention_mask [B, T], optional token_type_ids [B, T].
"""

import dataclasses
from typing import Optional

import jax.numpy as jnp

from cooperllm_jax.models import layers as L
from cooperllm_jax.models.common import Perturb, hook, lookup, scan_layers
from cooperllm_jax.models.spec import ParamSpec, init_params, stack_specs

POOLINGS = ('mean', 'cls', 'pooler')


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  family: str = 'bert'            # 'bert' (also MiniLM) | 'roberta' | 'distilbert'
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2        # 0: no token-type embeddings (DistilBERT)
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  pad_token_id: int = 0
  num_labels: int = 2
  pooling: str = 'mean'           # 'mean' (sentence-transformers), 'cls', 'pooler' (BERT's tanh)
  dtype: str = 'float32'          # compute dtype
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.family not in ('bert', 'roberta', 'distilbert'):
      raise ValueError(f'unknown encoder family {self.family!r}')
    if self.pooling not in POOLINGS:
      raise ValueError(f'pooling must be one of {POOLINGS}, got {self.pooling!r}')
    if self.hidden_size % self.num_heads:
      raise ValueError('hidden_size must be divisible by num_heads')


def _dense(d_in, d_out, axes):
  return {'kernel': ParamSpec((d_in, d_out), axes), 'bias': ParamSpec((d_out,), axes[1:], 'zeros')}


def _norm(d):
  return {'scale': ParamSpec((d,), ('embed',), 'ones'), 'bias': ParamSpec((d,), ('embed',), 'zeros')}


class Encoder:
  """Pure functions of (params, batch) for one EncoderConfig."""

  def __init__(self, cfg: EncoderConfig):
    self.cfg = cfg

  @property
  def num_classes(self) -> int:
    return self.cfg.num_labels

  def specs(self):
    c = self.cfg
    h, f = c.hidden_size, c.intermediate_size
    embed = {'token': ParamSpec((c.vocab_size, h), ('vocab', 'embed')),
             'position': ParamSpec((c.max_positions, h), ('positions', 'embed')),
             'norm': _norm(h)}
    if c.type_vocab_size:
      embed['type'] = ParamSpec((c.type_vocab_size, h), ('token_types', 'embed'))
    layer = {
        'attn': {'q': _dense(h, h, ('embed', 'heads')), 'k': _dense(h, h, ('embed', 'heads')),
                 'v': _dense(h, h, ('embed', 'heads')), 'o': _dense(h, h, ('heads', 'embed'))},
        'attn_norm': _norm(h),
        'mlp': {'up': _dense(h, f, ('embed', 'mlp')), 'down': _dense(f, h, ('mlp', 'embed'))},
        'mlp_norm': _norm(h),
    }
    head = {'classifier': _dense(h, c.num_labels, ('embed', 'classes'))}
    if c.pooling == 'pooler':
      head['pooler'] = _dense(h, h, ('embed', 'embed_out'))
    return {'embed': embed, 'layers': stack_specs(layer, c.num_layers), 'head': head}

  def init(self, key):
    return init_params(self.specs(), key, jnp.dtype(self.cfg.param_dtype))

  def _positions(self, mask):
    t = mask.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), mask.shape)
    if self.cfg.family == 'roberta':  # RoBERTa numbers real tokens from padding_idx + 1
      pad = self.cfg.pad_token_id
      return jnp.where(mask > 0, pos + pad + 1, pad)
    return pos

  def _layer(self, x, p, mask):
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    b, t, h = x.shape
    n = c.num_heads
    split = lambda y: y.reshape(b, t, n, h // n)
    a = p['attn']
    q, k, v = (split(L.linear(a[name], x, dtype)) for name in ('q', 'k', 'v'))
    att = L.attention(q, k, v, mask, causal=False).reshape(b, t, h)
    x = L.layer_norm(p['attn_norm'], x + L.linear(a['o'], att, dtype), c.layer_norm_eps)
    up = L.activation(c.hidden_act)(L.linear(p['mlp']['up'], x, dtype))
    return L.layer_norm(p['mlp_norm'], x + L.linear(p['mlp']['down'], up, dtype), c.layer_norm_eps)

  def hidden(self, params, batch, perturb: Optional[Perturb] = None):
    """Last hidden states [B, T, H] in the compute dtype."""
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    ids, mask = batch['input_ids'], batch['attention_mask']
    e = params['embed']
    x = (lookup(perturb, ('embed', 'token'), e['token'], ids)
         + lookup(perturb, ('embed', 'position'), e['position'], self._positions(mask)))
    if c.type_vocab_size:
      types = batch.get('token_type_ids', jnp.zeros_like(ids))
      x = x + lookup(perturb, ('embed', 'type'), e['type'], types)
    norm = hook(perturb, 'embed', {'norm': e['norm']})['norm']
    x = L.layer_norm(norm, x.astype(dtype), c.layer_norm_eps)
    return scan_layers(lambda y, p: self._layer(y, p, mask), x, params['layers'], perturb)

  def pool(self, head, hidden, mask):
    c = self.cfg
    if c.pooling == 'mean':
      return L.masked_mean(hidden, mask)
    cls = hidden[:, 0].astype(jnp.float32)
    if c.pooling == 'pooler':
      return jnp.tanh(L.linear(head['pooler'], cls, jnp.float32))
    return cls

  def logits(self, params, batch, perturb: Optional[Perturb] = None):
    """Class logits [B, num_labels] in float32."""
    x = self.hidden(params, batch, perturb)
    head = hook(perturb, 'head', params['head'])
    pooled = self.pool(head, x, batch['attention_mask'])
    return L.linear(head['classifier'], pooled, jnp.float32)

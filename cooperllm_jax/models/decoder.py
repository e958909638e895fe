"""LLaMA-family decoder (LLaMA, SmolLM2, Mistral, Qwen2-style GQA): RoPE, RMSNorm, SwiGLU.

Two heads over one body: the causal-LM loss, and prompt-based classification as in MeZO (the
prompt ends with a cue such as "\\nTopic:", and class c is scored by the LM logit of its label word
at the last real token). Batches are right-padded: input_ids and attention_mask [B, T].
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from cooperllm_jax.models import layers as L
from cooperllm_jax.models.common import Perturb, hook, lookup, scan_layers
from cooperllm_jax.models.spec import ParamSpec, init_params, stack_specs


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int = 49152
  hidden_size: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  intermediate_size: int = 1536
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True
  attention_bias: bool = False     # Qwen2 has q/k/v biases
  max_positions: int = 8192
  hidden_act: str = 'silu'
  bos_token_id: Optional[int] = 1
  eos_token_id: Optional[int] = 2
  pad_token_id: int = 2
  label_token_ids: tuple[int, ...] = ()   # prompt classification: one LM token per class
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError('num_heads must be a multiple of num_kv_heads')


class Decoder:
  """Pure functions of (params, batch) for one DecoderConfig."""

  def __init__(self, cfg: DecoderConfig):
    self.cfg = cfg

  @property
  def num_classes(self) -> int:
    return len(self.cfg.label_token_ids)

  def specs(self):
    c = self.cfg
    h, f, d = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_heads * d, c.num_kv_heads * d

    def dense(d_in, d_out, axes, bias=False):
      p = {'kernel': ParamSpec((d_in, d_out), axes)}
      if bias:
        p['bias'] = ParamSpec((d_out,), axes[1:], 'zeros')
      return p

    layer = {
        'attn_norm': {'scale': ParamSpec((h,), ('embed',), 'ones')},
        'attn': {'q': dense(h, q, ('embed', 'heads'), c.attention_bias),
                 'k': dense(h, kv, ('embed', 'kv_heads'), c.attention_bias),
                 'v': dense(h, kv, ('embed', 'kv_heads'), c.attention_bias),
                 'o': dense(q, h, ('heads', 'embed'))},
        'mlp_norm': {'scale': ParamSpec((h,), ('embed',), 'ones')},
        'mlp': {'gate': dense(h, f, ('embed', 'mlp')), 'up': dense(h, f, ('embed', 'mlp')),
                'down': dense(f, h, ('mlp', 'embed'))},
    }
    specs = {'embed': {'token': ParamSpec((c.vocab_size, h), ('vocab', 'embed'))},
             'layers': stack_specs(layer, c.num_layers),
             'final_norm': {'scale': ParamSpec((h,), ('embed',), 'ones')}}
    if not c.tie_embeddings:
      specs['lm_head'] = {'kernel': ParamSpec((h, c.vocab_size), ('embed', 'vocab'))}
    return specs

  def init(self, key):
    return init_params(self.specs(), key, jnp.dtype(self.cfg.param_dtype))

  def _layer(self, x, p, mask, positions):
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    b, t, _ = x.shape
    a = p['attn']
    y = L.rms_norm(p['attn_norm'], x, c.rms_norm_eps)
    q = L.linear(a['q'], y, dtype).reshape(b, t, c.num_heads, c.head_dim)
    k = L.linear(a['k'], y, dtype).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = L.linear(a['v'], y, dtype).reshape(b, t, c.num_kv_heads, c.head_dim)
    q, k = L.rope(q, positions, c.rope_theta), L.rope(k, positions, c.rope_theta)
    att = L.attention(q, k, v, mask, causal=True).reshape(b, t, -1)
    x = x + L.linear(a['o'], att, dtype)
    y = L.rms_norm(p['mlp_norm'], x, c.rms_norm_eps)
    m = p['mlp']
    gated = L.activation(c.hidden_act)(L.linear(m['gate'], y, dtype)) * L.linear(m['up'], y, dtype)
    return x + L.linear(m['down'], gated, dtype)

  def _body(self, params, batch, perturb):
    """(final-normed hidden [B, T, H], unembed) where unembed(ids) gives unembedding rows [N, H].

    Tied models look their head rows up in the token table, so scoring a few label words never
    materializes (or perturbs) the whole vocabulary.
    """
    c = self.cfg
    ids, mask = batch['input_ids'], batch['attention_mask']
    table = params['embed']['token']
    x = lookup(perturb, ('embed', 'token'), table, ids).astype(jnp.dtype(c.dtype))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    x = scan_layers(lambda y, p: self._layer(y, p, mask, positions), x, params['layers'], perturb)
    x = L.rms_norm(hook(perturb, 'final_norm', params['final_norm']), x, c.rms_norm_eps)
    if c.tie_embeddings:
      return x, lambda rows: lookup(perturb, ('embed', 'token'), table, rows)
    return x, lambda rows: hook(perturb, 'lm_head', params['lm_head'])['kernel'].T[rows]

  def _vocab(self):
    return jnp.arange(self.cfg.vocab_size, dtype=jnp.int32)

  def lm_logits(self, params, batch, perturb: Optional[Perturb] = None):
    """Next-token logits [B, T, V] in float32."""
    x, unembed = self._body(params, batch, perturb)
    out = unembed(self._vocab()).astype(x.dtype)
    return jnp.einsum('bth,vh->btv', x, out, preferred_element_type=jnp.float32)

  def lm_loss(self, params, batch, perturb: Optional[Perturb] = None):
    """Mean causal-LM cross-entropy over real next tokens, float32."""
    logits = self.lm_logits(params, batch, perturb)[:, :-1]
    targets = batch['input_ids'][:, 1:]
    valid = (batch['attention_mask'][:, 1:] * batch['attention_mask'][:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * valid).sum() / jnp.maximum(valid.sum(), 1.0)

  def last_hidden(self, params, batch, perturb: Optional[Perturb] = None):
    """Hidden state at each row's last real token [B, H], and the unembed(ids) function."""
    x, unembed = self._body(params, batch, perturb)
    last = jnp.maximum(batch['attention_mask'].sum(-1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0], unembed

  def next_token_logits(self, params, batch, perturb: Optional[Perturb] = None):
    """LM logits [B, V] at each row's last real token (greedy generation, prompt scoring)."""
    h, unembed = self.last_hidden(params, batch, perturb)
    out = unembed(self._vocab()).astype(h.dtype)
    return jnp.einsum('bh,vh->bv', h, out, preferred_element_type=jnp.float32)

  def logits(self, params, batch, perturb: Optional[Perturb] = None):
    """Class logits [B, C]: the LM logits of the label words only (never the full vocabulary)."""
    if not self.cfg.label_token_ids:
      raise ValueError('DecoderConfig.label_token_ids is empty: set one label word per class')
    h, unembed = self.last_hidden(params, batch, perturb)
    words = unembed(jnp.asarray(self.cfg.label_token_ids, jnp.int32)).astype(h.dtype)
    return jnp.einsum('bh,ch->bc', h, words, preferred_element_type=jnp.float32)

"""Building blocks shared by the encoder and the decoder, as pure functions of param dicts.

Kernels are stored [in, out] (2-D, heads folded into the output axis) so every weight matrix has the
same layout for perturbation, quantization and row-block kernels. Params are cast to the compute
dtype at use; normalization, softmax and losses run in float32.
"""

import jax
import jax.numpy as jnp


def linear(p, x, dtype):
  y = jnp.einsum('...i,io->...o', x.astype(dtype), p['kernel'].astype(dtype))
  if 'bias' in p:
    y = y + p['bias'].astype(dtype)
  return y


def layer_norm(p, x, eps: float):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * p['scale'].astype(jnp.float32) + p['bias'].astype(jnp.float32)).astype(x.dtype)


def rms_norm(p, x, eps: float):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
  return (y * p['scale'].astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),   # BERT's erf GELU
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


def activation(name: str):
  return ACTIVATIONS[name]


def attention(q, k, v, mask, *, causal: bool):
  """Multi-head attention with grouped KV heads.

  q: [B, T, N, D]; k, v: [B, T, K, D] with N % K == 0; mask: [B, T] (1 = real token).
  Logits and softmax in float32 for parity with PyTorch references in any compute dtype.
  """
  b, t, n, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  allowed = mask[:, None, None, None, :].astype(bool)
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((t, t), bool))[None, None, None]
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, n, d)


def rope(x, positions, theta: float):
  """Rotary embedding in the rotate-half layout of HF LLaMA. x: [B, T, H, D]; positions: [B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, D/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def masked_mean(x, mask):
  m = mask.astype(jnp.float32)[..., None]
  return (x.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

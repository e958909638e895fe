"""Trainable subsets: which weights a client changes, and how they combine with the frozen rest.

A subset splits the model's params into `trainable` (a nested dict holding only the trained leaves,
at the same paths as in params) and `frozen` (the other leaves; no weight is held twice). The model runs on
`overlay(frozen, trainable)`; LoRA adds `lora_a` [layers, in, r] and `lora_b` [layers, r, out]
next to a kernel, which the perturbation hook folds into that layer's kernel inside the scan
(`W + alpha / r * A @ B`), so the merged model is never built during training. `materialize` builds
plain params for evaluation and checkpoints.

Modes:
  full    every leaf (MeZO);
  bitfit  every 'bias' leaf plus the head groups;
  head    the head groups only: every top-level group other than 'embed' and 'layers'
          (the encoder's classifier/pooler; a decoder's final norm and untied LM head);
  lora    rank-r adapters on `lora_targets` in every layer, plus the head groups.
"""

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.models.spec import path_hash, path_str
from cooperllm_jax.tree_math import PyTree

MODES = ('full', 'bitfit', 'head', 'lora')
BODY_GROUPS = ('embed', 'layers')
# The usual PEFT (Hugging Face) target_modules names of the layer weights, Llama-style and
# BERT-style, as this package's models name them.
LORA_ALIASES = {'q_proj': 'attn/q', 'k_proj': 'attn/k', 'v_proj': 'attn/v', 'o_proj': 'attn/o',
                'query': 'attn/q', 'key': 'attn/k', 'value': 'attn/v', 'gate_proj': 'mlp/gate',
                'up_proj': 'mlp/up', 'down_proj': 'mlp/down'}


def overlay(base, top):
  """base with top's leaves put in (and top's extra keys added), recursively; dicts only."""
  if not isinstance(top, dict):
    return top
  out = dict(base)
  for k, v in top.items():
    out[k] = overlay(base[k], v) if k in base and isinstance(base[k], dict) else v
  return out


def _select(tree, keep, prefix=()):
  out = {}
  for k, v in tree.items():
    path = prefix + (k,)
    if isinstance(v, dict):
      sub = _select(v, keep, path)
      if sub:
        out[k] = sub
    elif keep(path):
      out[k] = v
  return out


def lora_weights(layers: PyTree, prefix: tuple = ()) -> list:
  """The names LoRA targets can take in a model's stacked `layers`: every dense weight (a group
  holding a 'kernel'), as 'attn/q'."""
  out = ['/'.join(prefix)] if prefix and 'kernel' in layers else []
  for name, node in layers.items():
    if isinstance(node, dict):
      out += lora_weights(node, prefix + (name,))
  return out


def merge_lora(p, scale: float):
  """A layer's (or stacked layers') params with every lora_a/lora_b pair folded into its kernel."""
  if not isinstance(p, dict):
    return p
  p = {k: merge_lora(v, scale) for k, v in p.items()}
  if 'lora_a' in p:
    a, b = p.pop('lora_a'), p.pop('lora_b')
    delta = jnp.einsum('...ir,...ro->...io', a.astype(jnp.float32), b.astype(jnp.float32))
    p['kernel'] = (p['kernel'].astype(jnp.float32) + scale * delta).astype(p['kernel'].dtype)
  return p


@dataclasses.dataclass(frozen=True)
class Subset:
  """Which weights train: `split` divides the params into (trainable, frozen).

  Attributes:
    mode: 'full' (every weight), 'bitfit' (the head and every bias), 'head' (the head only) or
      'lora' (the head and LoRA adapters on the targets).
    lora_rank: the adapters' rank r (>= 1 with mode='lora').
    lora_alpha: the LoRA scale's numerator; the update is scaled by lora_alpha / lora_rank.
    lora_targets: the layer weights that get adapters ('attn/q', 'mlp/up', ...), PEFT names
      such as 'q_proj' accepted and mapped to these; duplicates are dropped.
  """
  mode: str = 'full'
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: Tuple[str, ...] = ('attn/q', 'attn/v')

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f'unknown trainable mode {self.mode!r}; choose one of {", ".join(MODES)}')
    # PEFT's names stand for ours (LORA_ALIASES); a weight named twice is adapted once.
    object.__setattr__(self, 'lora_targets', tuple(dict.fromkeys(
        LORA_ALIASES.get(t, t) for t in self.lora_targets)))
    if self.mode == 'lora' and self.lora_rank < 1:
      raise ConfigError(f'lora_rank must be >= 1, got {self.lora_rank}')

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.mode == 'lora' else 0.0

  def _keep(self, path) -> bool:
    head = path[0] not in BODY_GROUPS
    if self.mode == 'full':
      return True
    if self.mode == 'bitfit':
      return head or path[-1] == 'bias'
    return head  # head, lora

  def split(self, params: PyTree, key: Optional[jax.Array] = None) -> tuple[PyTree, PyTree]:
    """(trainable, frozen), disjoint. LoRA needs `key` to initialize A (B starts at zero, so the
    model is unchanged at step 0)."""
    trainable = _select(params, self._keep)
    frozen = _select(params, lambda path: not self._keep(path))
    if self.mode == 'lora':
      if key is None:
        raise ValueError('Subset(mode="lora").split needs a key to initialize the adapters')
      layers = params['layers']
      valid = sorted(lora_weights(layers))
      adapters = {}
      for target in self.lora_targets:
        if target not in valid:
          peft = [a for a, ours in LORA_ALIASES.items() if ours in valid]
          raise ConfigError(f'lora target {target!r} is not a layer weight of this model; choose '
                            f'from {", ".join(valid)} (or their PEFT names {", ".join(peft)})')
        names = target.split('/')
        node = layers
        for name in names:
          node = node[name]
        n, d_in, d_out = node['kernel'].shape
        path = ('layers',) + tuple(names) + ('lora_a',)
        a = jax.random.normal(jax.random.fold_in(key, path_hash(path)), (n, d_in, self.lora_rank))
        entry = {'lora_a': (a / jnp.sqrt(d_in)).astype(jnp.float32),
                 'lora_b': jnp.zeros((n, self.lora_rank, d_out), jnp.float32)}
        adapters = overlay(adapters, _nest(names, entry))
      trainable = overlay(trainable, {'layers': adapters})
    if not jax.tree.leaves(trainable):
      raise ConfigError(f'trainable mode {self.mode!r} selects no parameters of this model')
    return trainable, frozen

  def materialize(self, frozen: PyTree, trainable: PyTree) -> PyTree:
    """Plain model params (LoRA merged) for evaluation, checkpoints and the next round."""
    merged = overlay(frozen, trainable)
    if self.mode == 'lora':
      merged['layers'] = merge_lora(merged['layers'], self.lora_scale)
    return merged


def _nest(names, leaf):
  for name in reversed(names):
    leaf = {name: leaf}
  return leaf


def trainable_paths(trainable) -> frozenset:
  return frozenset(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0])

"""Applying directions: the forward-pass hook (theta + scale * z, one layer at a time) and the update
(theta - coef * z_step, leaf by leaf; z_step = z for plain ZO, ZGR's step direction with guidance),
both drawing from the key schedule; `master` keeps low-precision trainable weights in float32."""

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from cooperllm_jax.kernels.fused_perturb import fused_perturb
from cooperllm_jax.models.spec import path_str
from cooperllm_jax.tree_math import PyTree
from cooperllm_jax.zoo import guided
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.guided import Guidance, direction
from cooperllm_jax.zoo.quantized import dequantize, is_quantized, take_rows
from cooperllm_jax.zoo.trainable import merge_lora

IMPLS = ('xla', 'pallas')
# The group models/common.scan_layers hooks one layer at a time: its leaves are stacked [layers, ...].
STACKED = 'layers'


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """The models' `Perturb` hooks for params = overlay(frozen, trainable).

  Adds scale * z(key) to the trainable leaves (`paths`) that a forward pass touches, generating z
  for the layer being computed (inside lax.scan) or for the embedding rows looked up, and folds LoRA
  adapters into their kernels. key=None only merges LoRA (the unperturbed loss). With `guide`, z is
  ZGR's guided direction (zoo/guided.py) instead of the plain one. Frozen leaves kept quantized
  (zoo/quantized.py) are dequantized here, a layer or the looked-up rows at a time. `hoist` takes
  the trainable vectors (biases, norms) out of the hooks: they are perturbed before the forward.

  impl='pallas' perturbs 2-D trainable weights (a layer's slice of a stacked leaf, a rank-2 leaf)
  with the fused kernel (kernels/fused_perturb.py), which draws the same z bit for bit in the layout
  the key schedule uses for that case; other leaves and embedding rows (gathered by id) use XLA.
  """
  paths: frozenset
  key: Optional[jax.Array] = None
  scale: jax.Array | float = 0.0
  distribution: str = 'gaussian'
  lora_scale: float = 0.0
  guide: Optional[Guidance] = None
  impl: str = 'xla'

  def __post_init__(self):
    if self.impl not in IMPLS:
      raise ValueError(f'perturbation impl must be one of {IMPLS}, got {self.impl!r}')

  def hoist(self, trainable):
    """(trainable with its vectors perturbed, the Perturbation of the other leaves).

    Vectors are the leaves a forward pass uses one vector at a time (biases, norm scales: rank 1,
    or rank 2 in the stacked layers). Their z is cheap elementwise integer work that XLA on CPU fuses
    into the consumer that broadcasts the vector over the tokens, recomputing it once per token
    (MiniLM: ~6x the hash evaluations of all its layer kernels). Perturbed here, whole, before the
    forward pass (the whole-leaf draw: the bits of the per-layer one), each z is made once.
    """
    if self.key is None:
      return trainable, self
    done = set()

    def one(path, x):
      path = tuple(getattr(k, 'key', k) for k in path)
      if x.ndim - (path[0] == STACKED) > 1 or path_str(path) not in self.paths:
        return x
      done.add(path_str(path))
      return self._add(x, direction(self.key, path, x.shape, None, self.distribution, self.guide))

    trainable = jax.tree_util.tree_map_with_path(one, trainable)
    return trainable, dataclasses.replace(self, paths=self.paths - done)

  def _add(self, x, z):
    return (x.astype(jnp.float32) + self.scale * z).astype(jnp.promote_types(x.dtype, jnp.float32))

  def _perturb(self, path, x, layer):
    """x + scale * z for the trainable leaf at `path` (its slice `layer` when not None)."""
    if self.impl == 'pallas' and x.ndim == 2:
      return self._fused(path, x, layer)
    return self._add(x, direction(self.key, path, x.shape, layer, self.distribution, self.guide))

  def _fused(self, path, x, layer):
    """The kernel's layouts: a rank-2 leaf's rows are its slices, each drawn from fold_in(leaf key,
    row) ('rows'); a stacked leaf's layer is one draw from fold_in(leaf key, layer) ('flat')."""
    key = keys_lib.leaf_key(self.key, path)
    if layer is not None:
      key = jax.random.fold_in(key, jnp.asarray(layer, jnp.int32).astype(jnp.uint32))
    a, b, u, basis = 1.0, 0.0, None, None
    if self.guide is not None:
      a, u, basis = guided.terms(self.guide, self.key, path, layer, self.distribution)
      b = 1.0
    return fused_perturb(x, key, self.scale, a, b, basis, u,
                         layout='rows' if layer is None else 'flat',
                         out_dtype=jnp.promote_types(x.dtype, jnp.float32))

  def group(self, name, params, layer):
    def one(subpath, x):
      if is_quantized(x):  # frozen: never perturbed
        return dequantize(x)
      path = (name,) + tuple(getattr(k, 'key', k) for k in subpath)
      if self.key is None or path_str(path) not in self.paths:
        return x
      # layer: one layer's slice of a stacked leaf, which gets its slice of the whole-leaf draw.
      return self._perturb(path, x, layer)

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)
    return merge_lora(out, self.lora_scale) if self.lora_scale else out

  def rows(self, path, table, ids):
    if self.key is None or path_str(path) not in self.paths:
      return take_rows(table, ids)
    if table.shape[0] <= ids.size:  # small tables (positions, token types): draw once, then gather
      z = direction(self.key, path, table.shape, None, self.distribution, self.guide)
      return self._add(table, z)[ids]
    z = direction(self.key, path, table.shape[1:], ids, self.distribution, self.guide)
    return self._add(table[ids], z)


# Elements of threefry's z drawn at once by an update. On CPU, threefry runs its rounds in a while
# loop whose state is ~4-5 uint32 arrays of the draw's size, so a whole-leaf draw would cost ~4x the
# leaf (measured: 1.3 GiB of temporaries for SmolLM2's update); 64k-element blocks cost ~1 MiB.
# The counter hash is elementwise and fuses into the update, so its leaves are drawn whole.
UPDATE_BLOCK = 1 << 16


def master(tree):
  """The float32 master copy of a trainable tree: leaves stored in a floating type narrower than
  float32 (bfloat16, float16) are upcast, float32 leaves are returned as they are (the same arrays).

  Updates are computed in float32 but stored in the leaf's dtype, so a bfloat16 leaf silently drops
  every update smaller than half its ulp (2^-8 relative); ZO updates (lr * g * z, ~1e-6) are almost
  all that small. Whoever keeps trainable weights across steps (a client's local steps, the edge's
  global model) keeps master(tree) instead, and the forward passes read it as it is (the
  perturbation hooks already compute theta + eps z in float32)."""
  def up(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
      return x.astype(jnp.float32)
    return x
  return jax.tree.map(up, tree)


def _update_leaf(path, x, key, coef, distribution, guide):
  """x - coef * z_step for one leaf (z_step: z without guidance, zoo/guided.py's with it); under
  threefry rank >= 2 leaves in place, UPDATE_BLOCK elements (at least one leading-axis slice) at a
  time (slice_direction gives each slice the bits of the whole-leaf draw, so blocking does not
  change the result); a hash generator's leaf in one fused pass."""
  if x.ndim < 2 or keys_lib.hashed(distribution):
    z = direction(key, path, x.shape, None, distribution, guide, step=True)
    return (x.astype(jnp.float32) - coef * z).astype(x.dtype)
  n, row = x.shape[0], x.shape[1:]
  rows = max(1, min(n, UPDATE_BLOCK // math.prod(row)))

  def block(x, start, size):
    z = direction(key, path, row, start + jnp.arange(size, dtype=jnp.int32), distribution, guide,
                  step=True)
    old = jax.lax.dynamic_slice_in_dim(x, start, size)
    new = (old.astype(jnp.float32) - coef * z).astype(x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(x, new, start, 0)

  full, tail = divmod(n, rows)
  x = jax.lax.fori_loop(0, full, lambda i, x: block(x, i * rows, rows), x)
  return block(x, full * rows, tail) if tail else x


def apply_direction(tree, key: jax.Array, coef, distribution: str = 'gaussian',
                    guide: Optional[Guidance] = None):
  """tree - coef * z(key) for every leaf: one ledger entry's update. The client's own step and the
  edge's replay both call this, so replay reproduces the client bit for bit."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _update_leaf(path, x, key, coef, distribution, guide), tree)


def coefficients(lr: ArrayLike, scalars: ArrayLike, weights: ArrayLike) -> ArrayLike:
  """Update coefficients lr * (weight * g) of ledger entries: the one formula the client's step and
  the edge's replay share (weight is 1/P for a P-probe average, 0 for padding).

  Args:
    lr: the learning rate (a scalar).
    scalars: the entries' projected gradients g (float32, any shape).
    weights: the entries' weights, broadcastable against `scalars`.

  Returns:
    lr * (weights * scalars), broadcast to the shape of its arguments.
  """
  return lr * (weights * scalars)


def apply_directions(tree, keys: jax.Array, coefs: jax.Array, distribution: str = 'gaussian',
                     guide: Optional[Guidance] = None):
  """Applies entries (keys[i], coefs[i]) in order under fori_loop: the leaf is updated in place,
  with no z held for more than one fused pass. keys: [N] key array; coefs: float32 [N]."""
  def body(i, t):
    return apply_direction(t, keys[i], coefs[i], distribution, guide)

  return jax.lax.fori_loop(0, coefs.shape[0], body, tree)


def replay(tree: PyTree, seed: ArrayLike, addresses: jax.Array, coefs: jax.Array,
           distribution: str = 'gaussian', guide: Optional[Guidance] = None) -> PyTree:
  """The edge's replay of a ledger: addresses int32 [N, 4], coefs float32 [N] (already lr- and
  weight-scaled), under the round's guidance if any. Entries with coef 0 (padding, rejected
  scalars) leave the tree unchanged.

  Args:
    tree: the trainable tree to update.
    seed: the run's seed (the root of the probe keys).
    addresses: int32 [N, 4], the entries' (round, client, step, probe) addresses.
    coefs: float32 [N], the entries' coefficients (coefficients()).
    distribution: the directions' distribution, the clients' Estimator's.
    guide: the round's Guidance; None for plain directions.

  Returns:
    The tree after tree - coefs[i] * z(address i) for every entry in order, leaves in their
    own dtypes. Pure: nothing is donated (jit with donation to update in place).
  """
  return apply_directions(tree, keys_lib.address_keys(seed, addresses), coefs, distribution,
                          guide)

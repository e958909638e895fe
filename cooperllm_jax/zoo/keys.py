"""The key schedule: every perturbation direction is a pure function of integers.

A probe is addressed by (seed, round, client, step, probe):

    probe_key = fold_in(fold_in(fold_in(fold_in(key(seed, threefry2x32), round), client), step), probe)

and the direction z for one parameter leaf is drawn from

    leaf_key  = fold_in(probe_key, path_hash(leaf path))          # e.g. 'layers/attn/q/kernel'

A leaf of rank >= 2 is drawn one leading-axis slice at a time, slice i from fold_in(leaf_key, i):
one layer of a stacked [layers, ...] leaf, one row of an embedding table. So a client can draw the
noise of the layer it is computing inside lax.scan, or of the embedding rows a batch looks up, and
get exactly the bits of the whole-leaf draw that the edge uses to replay the update. Rank-0/1 leaves
are one draw. Negative address fields name shared pools (e.g. FedKSeed's candidate seeds use
round = client = step = -1).

Probe keys are threefry: its bits do not depend on the backend, so CPU, GPU and TPU agree.

Two generators turn a probe key into z. 'gaussian' and 'rademacher' draw as above with jax.random
(threefry, 20 rounds per 64 bits), which XLA on CPU runs as while loops over materialized state
(~1/3 of a full ZO step). The '_hash' variants draw element e of a leaf (row-major) from a
counter-based integer hash of (probe key, path hash, e) (counter_bits): elementwise integer ops
that XLA fuses into the op that uses z; a slice of the leaf is its counters' draws. Both are
integer-only before the float conversion, hence backend-invariant; the Gaussians share
jax.random.normal's uniform -> sqrt(2) erf_inv tail. The two give different z: a run's bits depend
on the choice.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from cooperllm_jax.models.spec import path_hash

DISTRIBUTIONS = ('gaussian', 'rademacher', 'gaussian_hash', 'rademacher_hash')
ADDRESS_FIELDS = ('round', 'client', 'step', 'probe')


def root_key(seed: ArrayLike) -> jax.Array:
  return jax.random.key(seed, impl='threefry2x32')


def address_key(seed: ArrayLike, address: Sequence[ArrayLike]) -> jax.Array:
  """The probe key of address = (round, client, step, probe); ints or traced int32 scalars.

  Args:
    seed: the run's seed (int or traced scalar).
    address: the (round, client, step, probe) fields, each folded into the seed's threefry key.

  Returns:
    A threefry2x32 typed key (shape []).
  """
  key = root_key(seed)
  for field in address:
    key = jax.random.fold_in(key, jnp.asarray(field, jnp.int32).astype(jnp.uint32))
  return key


def address_keys(seed: ArrayLike, addresses: jax.Array) -> jax.Array:
  """Probe keys for int32 addresses of shape [..., 4] (vmapped address_key).

  Args:
    seed: the run's seed.
    addresses: int32 [..., 4], (round, client, step, probe) in the last axis.

  Returns:
    Threefry2x32 typed keys of shape [...].
  """
  flat = addresses.reshape(-1, len(ADDRESS_FIELDS))
  keys = jax.vmap(lambda a: address_key(seed, tuple(a)))(flat)
  return keys.reshape(addresses.shape[:-1])


def _path_hash(path) -> int:
  """path: a tree path, a tuple of names, or 'a/b/c'."""
  return path_hash(tuple(path.split('/')) if isinstance(path, str) else path)


def leaf_key(key: jax.Array, path) -> jax.Array:
  """The leaf's threefry stream."""
  return jax.random.fold_in(key, _path_hash(path))


def _check(distribution: str):
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f'unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}')


def hashed(distribution: str) -> bool:
  """Whether `distribution` draws from the counter hash (z of any element set costs no state)."""
  _check(distribution)
  return distribution.endswith('_hash')


def _draw(key, shape, distribution: str):
  if distribution == 'gaussian':
    return jax.random.normal(key, shape, jnp.float32)
  if distribution == 'rademacher':
    return jax.random.rademacher(key, shape, jnp.float32)
  _check(distribution)
  raise ValueError(f'{distribution!r} is drawn by counter, not by key alone')


def _mix(x):
  """A 32-bit bijection with full avalanche (Wellons' lowbias32: bias ~0.17 of a random one)."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _hash(words, counters):
  """Three mixes of uint32 counters keyed by two uint32 words."""
  k0, k1 = words
  return _mix(_mix(_mix(counters ^ k0) + k1) ^ k0)


def counter_bits(key: jax.Array, path, counters: jax.Array) -> jax.Array:
  """uint32 bits of a leaf's element counters (uint32). The leaf's words are the probe key's
  hash at counters 2h, 2h + 1 (h: the 31-bit path hash), not a threefry fold_in: inside the layer
  scan a fold_in is a scalar while loop per leaf and layer that XLA does not hoist."""
  h = _path_hash(path)
  words = _hash(jax.random.key_data(key), jnp.array([2 * h, 2 * h + 1], jnp.uint32))
  return _hash((words[0], words[1]), counters)


def _from_bits(bits, distribution: str):
  """float32 z from uint32 bits, as jax.random.normal / rademacher map their bits."""
  if distribution == 'rademacher_hash':
    return jnp.where(bits >> 31 == 0, jnp.float32(1.0), jnp.float32(-1.0))
  one = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))    # uniform on [lo, 1), as jax's normal
  u = jnp.maximum(lo, one * (np.float32(1.0) - lo) + lo)
  return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)


def _counter_draw(key, path, index, slice_shape, distribution):
  """z of slices `index` (None: the whole leaf of slice_shape) of the leaf at `path`, by counter."""
  size = math.prod(slice_shape)
  if index is None:
    counters = jnp.arange(size, dtype=jnp.uint32).reshape(slice_shape)
  else:
    index = jnp.asarray(index, jnp.int32).astype(jnp.uint32)
    counters = (index.reshape(index.shape + (1,) * len(slice_shape)) * jnp.uint32(size)
                + jnp.arange(size, dtype=jnp.uint32).reshape(slice_shape))
  return _from_bits(counter_bits(key, path, counters), distribution)


def slice_direction(key: jax.Array, path, index, slice_shape: Sequence[int],
                    distribution: str = 'gaussian') -> jax.Array:
  """z of the leading-axis slice(s) `index` (int or int array) of a rank >= 2 leaf, float32.

  Returns index.shape + slice_shape.
  """
  if hashed(distribution):
    return _counter_draw(key, path, index, tuple(slice_shape), distribution)
  lk = leaf_key(key, path)
  index = jnp.asarray(index, jnp.int32)
  one = lambda i: _draw(jax.random.fold_in(lk, i.astype(jnp.uint32)), tuple(slice_shape),
                        distribution)
  flat = jax.vmap(one)(index.reshape(-1))
  return flat.reshape(index.shape + tuple(slice_shape))


def leaf_direction(key: jax.Array, path, shape: Sequence[int],
                   distribution: str = 'gaussian') -> jax.Array:
  """z for a whole leaf of `shape`, float32: the one function the clients, edge and cloud share."""
  shape = tuple(shape)
  if hashed(distribution):
    if math.prod(shape) > 2 ** 32:
      raise ValueError(f'leaf {path} of shape {shape} has more elements than 32-bit counters')
    return _counter_draw(key, path, None, shape, distribution)
  if len(shape) < 2:
    return _draw(leaf_key(key, path), shape, distribution)
  return slice_direction(key, path, jnp.arange(shape[0], dtype=jnp.int32), shape[1:], distribution)


def tree_direction(key: jax.Array, tree, distribution: str = 'gaussian'):
  """z for every leaf of a params-like tree (tests, the cloud's projections), float32."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: leaf_direction(key, path, x.shape, distribution), tree)

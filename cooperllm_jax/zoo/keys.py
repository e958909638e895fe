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

Threefry only: its bits do not depend on the backend, so CPU, GPU and TPU agree on every z.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from cooperllm_jax.models.spec import path_hash

DISTRIBUTIONS = ('gaussian', 'rademacher')
ADDRESS_FIELDS = ('round', 'client', 'step', 'probe')


def root_key(seed) -> jax.Array:
  return jax.random.key(seed, impl='threefry2x32')


def address_key(seed, address: Sequence) -> jax.Array:
  """The probe key of address = (round, client, step, probe); ints or traced int32 scalars."""
  key = root_key(seed)
  for field in address:
    key = jax.random.fold_in(key, jnp.asarray(field, jnp.int32).astype(jnp.uint32))
  return key


def address_keys(seed, addresses: jax.Array) -> jax.Array:
  """Probe keys for int32 addresses of shape [..., 4] (vmapped address_key)."""
  flat = addresses.reshape(-1, len(ADDRESS_FIELDS))
  keys = jax.vmap(lambda a: address_key(seed, tuple(a)))(flat)
  return keys.reshape(addresses.shape[:-1])


def leaf_key(key: jax.Array, path) -> jax.Array:
  """The leaf's stream: path is a tree path, a tuple of names, or 'a/b/c'."""
  if isinstance(path, str):
    path = tuple(path.split('/'))
  return jax.random.fold_in(key, path_hash(path))


def _draw(key, shape, distribution: str):
  if distribution == 'gaussian':
    return jax.random.normal(key, shape, jnp.float32)
  if distribution == 'rademacher':
    return jax.random.rademacher(key, shape, jnp.float32)
  raise ValueError(f'unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}')


def slice_direction(key: jax.Array, path, index, slice_shape: Sequence[int],
                    distribution: str = 'gaussian') -> jax.Array:
  """z of the leading-axis slice(s) `index` (int or int array) of a rank >= 2 leaf, float32.

  Returns index.shape + slice_shape.
  """
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
  if len(shape) < 2:
    return _draw(leaf_key(key, path), shape, distribution)
  return slice_direction(key, path, jnp.arange(shape[0], dtype=jnp.int32), shape[1:], distribution)


def tree_direction(key: jax.Array, tree, distribution: str = 'gaussian'):
  """z for every leaf of a params-like tree (tests, the cloud's projections), float32."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: leaf_direction(key, path, x.shape, distribution), tree)

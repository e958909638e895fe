"""Parameter specs: one table per model gives every weight's shape, logical axes and init.

The same table drives random init, the loaders' shape checks (a missing or mis-shaped tensor is a
one-line error naming it), abstract shapes for memory analysis, and sharding (logical axis names are
mapped to mesh axes by rules, as in Flax's `logical_to_mesh_sharding`).
"""

import dataclasses
import hashlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax.errors import LoaderError

Params = Any  # nested dict of arrays


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str, ...]   # one logical axis name per dimension
  init: str = 'normal'    # 'normal' | 'zeros' | 'ones'

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f'shape {self.shape} and axes {self.axes} differ in rank')

  def stacked(self, n: int) -> 'ParamSpec':
    """The spec of n copies stacked on a leading 'layers' axis (for lax.scan over layers)."""
    return ParamSpec((n,) + self.shape, ('layers',) + self.axes, self.init)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def path_str(path) -> str:
  """'layers/attn/q/kernel' for a tree path of dict keys."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def path_hash(path) -> int:
  """A stable 31-bit hash of a leaf's path (unlike the flatten index, it survives adding leaves)."""
  return int.from_bytes(hashlib.sha256(path_str(path).encode()).digest()[:4], 'little') & 0x7FFFFFFF


def stack_specs(specs, n: int):
  return jax.tree.map(lambda s: s.stacked(n), specs, is_leaf=is_spec)


def logical_axes(specs):
  """The pytree of logical axis-name tuples, mirroring the params."""
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def abstract_params(specs, dtype) -> Params:
  """ShapeDtypeStructs for measuring compiled functions without allocating the weights."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)


def init_params(specs, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random init (truncated-free normal * std, zeros, ones); each leaf keyed by its path hash."""

  def one(path, s: ParamSpec):
    if s.init == 'zeros':
      return jnp.zeros(s.shape, dtype)
    if s.init == 'ones':
      return jnp.ones(s.shape, dtype)
    return (std * jax.random.normal(jax.random.fold_in(key, path_hash(path)), s.shape)).astype(dtype)

  return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def build_params(specs, fetch: Callable[[str, ParamSpec], np.ndarray], source: str,
                 dtype=jnp.float32) -> Params:
  """Fills `specs` with fetch(path, spec); checks every shape, naming the tensor on mismatch."""

  def one(path, s: ParamSpec):
    name = path_str(path)
    value = np.asarray(fetch(name, s))
    if tuple(value.shape) != tuple(s.shape):
      raise LoaderError(f'{source}: tensor for {name!r} has shape {tuple(value.shape)}, '
                        f'expected {tuple(s.shape)}')
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def flatten_names(tree: Mapping) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

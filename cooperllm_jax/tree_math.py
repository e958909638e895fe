"""Pytree arithmetic shared by the estimators, the cloud's pool and the algorithms' accounting."""

import math
from typing import Any

import jax
import jax.numpy as jnp

# A JAX pytree: nested dicts, tuples and lists of arrays (params, trainable weights, directions).
PyTree = Any


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  """<a, b> over every leaf, accumulated in float32."""
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_size(tree: PyTree) -> int:
  """Number of scalars in the tree (d of an estimator over it); static."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_bytes(tree: PyTree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

"""Pytree arithmetic shared by the estimators, the cloud's pool and the algorithms' accounting."""

import math

import jax
import jax.numpy as jnp


def tree_dot(a, b) -> jax.Array:
  """<a, b> over every leaf, accumulated in float32."""
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_size(tree) -> int:
  """Number of scalars in the tree (d of an estimator over it); static."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

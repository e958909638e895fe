"""The cloud's direction pool: the last m BP directions, orthonormalized into ZGR's basis V.

Directions are pytrees over the trainable leaves; the pool stacks them on a leading axis of size m,
newest first. The basis comes from QR by Gram-Schmidt run twice ("twice is enough": orthogonal to
working precision even for nearly parallel directions) with tree dot products, so no [d, m] matrix
is ever flattened: each leaf keeps its shape (and, on a mesh, its sharding). A direction that adds
less than `rank_tol` of its own norm to the span of the newer ones (e.g. the same gradient twice)
gets an invalid slot rather than an amplified rounding error; samplers skip invalid slots.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax.tree_math import PyTree, tree_dot


class Pool(NamedTuple):
  """The last m cloud directions, newest first (a pytree; jittable).

  Attributes:
    directions: the trainable tree's structure, leaves [m, *shape] float32, newest first
      (unfilled slots are zero).
    filled: int32 scalar, how many slots hold a direction (at most m).
  """
  directions: dict     # trainable-tree structure, leaves [m, *shape] float32, newest first
  filled: jax.Array    # int32: how many slots hold a direction


def empty_pool(trainable: PyTree, m: int) -> Pool:
  """A pool of m slots shaped like the trainable weights, none filled.

  Args:
    trainable: the trainable tree (only its structure and leaf shapes are used).
    m: the number of slots.

  Returns:
    A Pool with float32 zero leaves [m, *leaf.shape] and filled 0.
  """
  return Pool(jax.tree.map(lambda x: jnp.zeros((m,) + x.shape, jnp.float32), trainable),
              jnp.int32(0))


def push(pool: Pool, direction: PyTree) -> Pool:
  """The pool with `direction` as the newest entry; the oldest falls out when all m are filled.

  Args:
    pool: the Pool.
    direction: a tree shaped like the trainable weights (cast to float32).

  Returns:
    A new Pool (slot 0 holds `direction`, the rest shift by one; filled + 1, at most m).
  """
  def one(stack, d):
    return jnp.concatenate([d[None].astype(jnp.float32), stack[:-1]], axis=0)

  m = jax.tree.leaves(pool.directions)[0].shape[0]
  return Pool(jax.tree.map(one, pool.directions, direction), jnp.minimum(pool.filled + 1, m))


def orthonormalize(pool: Pool, rank_tol: float = 1e-4) -> tuple[PyTree, jax.Array]:
  """(basis, valid): basis leaves [m, *shape] orthonormal over the whole tree (invalid slots zero),
  spanning the pool's directions newest first; valid float32 [m].

  Args:
    pool: the Pool.
    rank_tol: a direction whose part outside the newer ones' span is at most rank_tol of its
      own norm gets an invalid slot (as do unfilled and zero slots).

  Returns:
    (basis, valid): basis, the pool's tree structure with float32 leaves [m, *shape]; valid,
    float32 [m], 1 for a slot in use and 0 otherwise.
  """
  m = jax.tree.leaves(pool.directions)[0].shape[0]
  vectors = [jax.tree.map(lambda x, j=j: x[j], pool.directions) for j in range(m)]
  basis, valid = [], []
  for j, w in enumerate(vectors):
    norm0 = jnp.sqrt(tree_dot(w, w))
    for _ in range(2):
      for q in basis:
        c = tree_dot(q, w)
        w = jax.tree.map(lambda x, y, c=c: x - c * y, w, q)
    norm = jnp.sqrt(tree_dot(w, w))
    ok = (j < pool.filled) & (norm0 > 0) & (norm > rank_tol * norm0)
    scale = jnp.where(ok, 1.0 / jnp.where(ok, norm, 1.0), 0.0)
    basis.append(jax.tree.map(lambda x, s=scale: x * s, w))
    valid.append(ok)
  return (jax.tree.map(lambda *xs: jnp.stack(xs), *basis),
          jnp.stack(valid).astype(jnp.float32))


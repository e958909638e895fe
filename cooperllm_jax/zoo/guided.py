"""ZGR's guided perturbations: random directions mixed with the cloud's gradient subspace.

The cloud sends an orthonormal basis V = [V_1 .. V_m] of recent BP directions over the trainable
leaves (d weights in all). A probe with key k draws v ~ N(0, I_d) from the key schedule (exactly the
plain ZO direction) and u ~ N(0, I_m) (or Rademacher) from the reserved path GUIDE_PATH, and uses

    z = beta * ( sqrt(alpha) v + sqrt((1 - alpha) d / m) V u ),     Cov(z) = beta^2 C,
    C = alpha I + (1 - alpha) (d / m) V V^T.

This is the paper's form z = beta' (sqrt(alpha/d) v + sqrt((1-alpha)/m) V u) with beta' = beta sqrt(d):
we scale so that E|z|^2 = beta^2 d for every alpha, and alpha = 1 (or an empty basis) is *exactly*
the plain ZO direction, bit for bit, with no hidden 1/d shrink of the estimate. The SPSA estimate
g z then has mean beta^2 C grad: the random part is MeZO's unbiased gradient, the guided part is
the private gradient's projection onto V, amplified d/m times (a full gradient step within the
subspace at the learning rate that keeps plain ZO stable; that is where the speed-up comes from).

Everything is a function of (key, Guidance), so the edge replays clients' updates from
(addresses, scalars, V).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax.zoo import keys as keys_lib

GUIDE_PATH = ('__guidance__', 'u')  # u's stream: a path no model has


class Guidance(NamedTuple):
  """What a client needs to sample guided directions (a pytree; every field may be traced).

  basis: the trainable tree's structure, each leaf [m, *leaf.shape] float32, orthonormal over the
         concatenation of all leaves (unused slots are zero);
  valid: float32 [m], 1 for a basis vector in use;
  alpha: float32 scalar in [0, 1], the share of the random part;
  beta:  float32 scalar, overall scale (1 = E|z|^2 = d).
  """
  basis: dict
  valid: jax.Array
  alpha: jax.Array
  beta: jax.Array


def make_guidance(basis, valid, alpha, beta=1.0) -> Guidance:
  return Guidance(basis, jnp.asarray(valid, jnp.float32), jnp.asarray(alpha, jnp.float32),
                  jnp.asarray(beta, jnp.float32))


def dimension(guide: Guidance) -> int:
  """d: the number of trainable weights the basis spans (static)."""
  return sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(guide.basis))


def subspace_draw(key: jax.Array, m: int, distribution: str) -> jax.Array:
  """u [m] of the probe with key `key`: the edge recomputes it for statistics and replay."""
  return keys_lib.leaf_direction(key, GUIDE_PATH, (m,), distribution)


def mixing(guide: Guidance, key: jax.Array, distribution: str):
  """(a, w): z = a v + sum_j w_j V_j for the probe with key `key`."""
  m_eff = guide.valid.sum()
  alpha = jnp.where(m_eff > 0, guide.alpha, 1.0)
  u = subspace_draw(key, guide.valid.shape[0], distribution)
  a = guide.beta * jnp.sqrt(alpha)
  w = guide.beta * jnp.sqrt((1.0 - alpha) * dimension(guide) / jnp.maximum(m_eff, 1.0))
  return a, w * u * guide.valid


def basis_leaf(guide: Guidance, path) -> jax.Array:
  """The basis leaf [m, *shape] at a tree path (tuple of names or tree path entries)."""
  node = guide.basis
  for k in path:
    node = node[getattr(k, 'key', k)]
  return node


def terms(guide: Guidance, key: jax.Array, path, index=None, distribution: str = 'gaussian'):
  """(a, w, basis): z = a v + sum_j w_j basis_j for the leaf at `path` (its slices `index`), basis
  [m, *z.shape]; the pieces `direction` and the fused perturbation kernel both combine."""
  a, w = mixing(guide, key, distribution)
  basis = basis_leaf(guide, path)
  if index is not None:
    basis = jnp.take(basis, jnp.asarray(index, jnp.int32), axis=1)
  return a, w, basis


def direction(key: jax.Array, path, shape, index=None, distribution: str = 'gaussian',
              guide: Guidance | None = None) -> jax.Array:
  """z of one leaf (index=None, shape = the leaf's) or of leading-axis slices `index` of a rank >= 2
  leaf (shape = one slice's), float32: the single place plain and guided directions are made."""
  if index is None:
    v = keys_lib.leaf_direction(key, path, shape, distribution)
  else:
    v = keys_lib.slice_direction(key, path, index, shape, distribution)
  if guide is None:
    return v
  a, w, basis = terms(guide, key, path, index, distribution)
  return a * v + jnp.tensordot(w, basis, axes=1)


def covariance_diag_and_subspace(guide: Guidance):
  """(alpha', c) with E[z z^T] = beta^2 (alpha' I + c V V^T): the estimator's expected scaling of the
  gradient (tests and the adaptive mixing use it)."""
  m_eff = guide.valid.sum()
  alpha = jnp.where(m_eff > 0, guide.alpha, 1.0)
  c = (1.0 - alpha) * dimension(guide) / jnp.maximum(m_eff, 1.0)
  return guide.beta ** 2 * alpha, guide.beta ** 2 * c

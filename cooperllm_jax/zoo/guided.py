"""ZGR's guided perturbations: random directions mixed with the cloud's gradient subspace.

The cloud sends an orthonormal basis V = [V_1 .. V_m] of recent BP directions over the trainable
leaves (d weights in all). A probe with key k draws v ~ N(0, I_d) from the key schedule (exactly the
plain ZO direction) and u ~ N(0, I_m) (or Rademacher) from the reserved path GUIDE_PATH.

Probe (what the forward passes add, theta +- eps z):

    z = a v + b V u,      a = beta sqrt(alpha),   b = beta s sqrt(1 - alpha),     s = probe_v.

Step (what the update subtracts, theta - lr w g z_step, one ledger entry per probe):

    z_step = c (beta^2 / a) v + (rho / b) V u,     rho = step_v = lr_V / lr,  c = step_plain

Why these scales. Write h = V^T grad (the private gradient's coordinates in the cloud
subspace). For central differences g = z . grad + O(eps^2) = a v.grad + b u.h + O(eps^2).

* Probe radius. The plain part moves the weights by eps a (v . e) ~ eps a N(0, 1) along any fixed
  unit direction e, and eps a sqrt(d) in all (spread over d directions). The guided part moves them
  by eps b u_j along V_j, eps b sqrt(m) in all. With b = O(1) (s = 1), the displacement along the
  cloud's directions (the steep ones) is the same per-direction radius as the plain part's, so the
  finite difference stays in the regime eps was tuned for at every d. The old form
  b = beta sqrt((1 - alpha) d / m) moved the weights by eps beta sqrt((1 - alpha) d) along the
  steepest directions: 0.03 for a head, ~7 at d = 1e8.
* Step. E[g v] = a grad and E[g u] = b h (v, u independent, E[uu^T] = I), so

      E[g z_step] = c beta^2 grad + rho P_V grad,  E[theta' - theta] = -(c lr beta^2 grad + lr_V V h):

  the plain part is a MeZO step at the plain rate c lr (beta^2 times), whatever alpha (c = 1
  unless the round's plain rate is capped below lr: cooperllm's zgr.trace_cap), and the
  subspace part is a first-order step at the rate lr_V along the estimate V (g u / b) of P_V grad,
  both unbiased for any distribution of v and u with identity covariance. alpha only splits the
  probe's energy between the two estimates. (The form before this one stepped a v, so its plain
  step was alpha times FedMeZO's: a cloud without signal cost half the plain progress at
  alpha = 0.5, 4 points on BBC News LoRA with shuffled public labels.) alpha = 0 has no plain
  estimate and no plain step. lr_V is a gradient descent rate: its stable range is set by the
  loss's curvature along V (lr_V < 2 / L_V), not by d. The old step lr (1 - alpha)(d / m) P_V grad
  grew linearly with d at fixed lr.
* Noise. The per-probe subspace estimate g u / b has covariance (a / b)^2 |grad|^2 I + |h|^2 I +
  h h^T (Gaussian u): bounded by (alpha / ((1 - alpha) s^2) + 2) |grad|^2 per coordinate, free of d.
  The plain estimate (beta^2 / a) g v has covariance ~ beta^4 d (|grad|^2 + (b / a)^2 |h|^2) / beta^2:
  MeZO's when the cloud holds little of the gradient (|h| small), (b / a)^2 = (1 - alpha) s^2 /
  alpha times more of |h|^2 otherwise, so a small alpha makes the plain step noisy.

Defaults (make_guidance): beta = 1, probe_v = 1, step_v = 1 (lr_V = lr; the algorithm that knows
both rates sets step_v = lr_V / lr, see DEFAULT_LR_V), step_plain = 1. alpha = 1 (or an empty
basis) gives a = beta, b = 0 and a zero subspace weight in both the probe and the step: the plain
ZO direction and update, bit for bit with beta = 1 and step_plain = 1 (c beta^2 / a is computed as
c beta (beta / a) = beta there).

Everything is a function of (key, Guidance), so the edge replays clients' updates from
(addresses, scalars, V, hyperparameters). The adaptive mixing's estimators are in zoo/mixing.py.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from cooperllm_jax.zoo import keys as keys_lib

GUIDE_PATH = ('__guidance__', 'u')  # u's stream: a path no model has

# A first-order rate for the step along V (the SGD learning rate within the cloud subspace):
# d-free by construction; the callers that know the plain lr turn it into step_v = lr_V / lr.
DEFAULT_LR_V = 0.1
DEFAULT_PROBE_V = 1.0


class Guidance(NamedTuple):
  """What a client needs to sample guided directions (a pytree; every field may be traced).

  Attributes:
    basis: the trainable tree's structure, each leaf [m, *leaf.shape] float32, orthonormal over
      the concatenation of all leaves (unused slots are zero).
    valid: float32 [m], 1 for a basis vector in use.
    alpha: float32 scalar in [0, 1], the random part's share of the probe (a^2 = beta^2 alpha).
    beta: float32 scalar, overall scale of the probe's plain part.
    probe_v: float32 scalar s, the subspace part's radius relative to the plain part's
      per-direction radius (b = beta s sqrt(1 - alpha)).
    step_v: float32 scalar rho = lr_V / lr, the rate of the step along V relative to the plain
      lr.
    step_plain: float32 scalar c, the plain step's rate relative to lr (1 unless capped).
  """
  basis: dict
  valid: jax.Array
  alpha: jax.Array
  beta: jax.Array
  probe_v: jax.Array
  step_v: jax.Array
  step_plain: jax.Array


def make_guidance(basis: dict, valid: ArrayLike, alpha: ArrayLike, beta: ArrayLike = 1.0,
                  probe_v: ArrayLike = DEFAULT_PROBE_V, step_v: ArrayLike = 1.0,
                  step_plain: ArrayLike = 1.0) -> Guidance:
  """A Guidance from an orthonormal basis (pool.orthonormalize's (basis, valid)) and the mixing:
  alpha = 1 or an empty basis is plain ZO.

  Args:
    basis: the orthonormal basis, leaves [m, *leaf.shape] float32 (pool.orthonormalize).
    valid: [m], 1 for a basis vector in use (pool.orthonormalize).
    alpha: in [0, 1], the random part's share of the probe.
    beta: the overall scale of the probe's plain part.
    probe_v: the subspace part's radius relative to the plain part's per-direction radius.
    step_v: step_ratio(lr_V, lr), which sets the first-order rate lr_V of the step along V.
    step_plain: the plain step's rate as a share of lr.

  Returns:
    The Guidance, every scalar (and valid) cast to float32; basis as given.
  """
  f = lambda x: jnp.asarray(x, jnp.float32)
  return Guidance(basis, f(valid), f(alpha), f(beta), f(probe_v), f(step_v), f(step_plain))


def _safe_over(num, den):
  """num / den, 0 where den is 0 (a part of the probe that is absent, or lr = 0)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def step_ratio(lr_v: ArrayLike, lr: ArrayLike) -> jax.Array:
  """step_v = lr_V / lr (0 where lr is 0: nothing moves then anyway).

  Args:
    lr_v: lr_V, the first-order rate of the step along V.
    lr: the plain learning rate.

  Returns:
    float32 lr_v / lr, 0 where lr <= 0.
  """
  return _safe_over(jnp.asarray(lr_v, jnp.float32), jnp.asarray(lr, jnp.float32))


def subspace_draw(key: jax.Array, m: int, distribution: str) -> jax.Array:
  """u [m] of the probe with key `key`: the edge recomputes it for statistics and replay."""
  return keys_lib.leaf_direction(key, GUIDE_PATH, (m,), distribution)


def scales(guide: Guidance):
  """(a, b): the probe is z = a v + b V u (b = 0 for an empty basis)."""
  m_eff = guide.valid.sum()
  alpha = jnp.where(m_eff > 0, guide.alpha, 1.0)
  a = guide.beta * jnp.sqrt(alpha)
  b = guide.beta * guide.probe_v * jnp.sqrt(1.0 - alpha)
  return a, b


def mixing(guide: Guidance, key: jax.Array, distribution: str, step: bool = False):
  """(a, w): z = a v + sum_j w_j V_j for the probe with key `key` (step=True: z_step, the update's
  direction: c beta^2 / a on v and rho / b u on V)."""
  a, b = scales(guide)
  u = subspace_draw(key, guide.valid.shape[0], distribution)
  if step:
    a = guide.step_plain * guide.beta * _safe_over(guide.beta, a)
    b = _safe_over(guide.step_v, b)
  return a, b * u * guide.valid


def basis_leaf(guide: Guidance, path) -> jax.Array:
  """The basis leaf [m, *shape] at a tree path (tuple of names or tree path entries)."""
  node = guide.basis
  for k in path:
    node = node[getattr(k, 'key', k)]
  return node


def terms(guide: Guidance, key: jax.Array, path, index=None, distribution: str = 'gaussian',
          step: bool = False):
  """(a, w, basis): z = a v + sum_j w_j basis_j for the leaf at `path` (its slices `index`), basis
  [m, *z.shape]; the pieces `direction` and the fused perturbation kernel both combine (step=True:
  the update's z_step)."""
  a, w = mixing(guide, key, distribution, step)
  basis = basis_leaf(guide, path)
  if index is not None:
    basis = jnp.take(basis, jnp.asarray(index, jnp.int32), axis=1)
  return a, w, basis


def direction(key: jax.Array, path, shape, index=None, distribution: str = 'gaussian',
              guide: Guidance | None = None, step: bool = False) -> jax.Array:
  """z of one leaf (index=None, shape = the leaf's) or of leading-axis slices `index` of a rank >= 2
  leaf (shape = one slice's), float32: the single place plain and guided directions are made.
  step=True gives the update's direction z_step (the same as z without guidance)."""
  if index is None:
    v = keys_lib.leaf_direction(key, path, shape, distribution)
  else:
    v = keys_lib.slice_direction(key, path, index, shape, distribution)
  if guide is None:
    return v
  a, w, basis = terms(guide, key, path, index, distribution, step)
  return a * v + jnp.tensordot(w, basis, axes=1)


def covariance_diag_and_subspace(guide: Guidance):
  """(a^2, b^2) with E[z z^T] = a^2 I + b^2 V V^T: the probe's covariance (the estimators in
  zoo/mixing.py and the adaptive mixing use it)."""
  a, b = scales(guide)
  return a ** 2, b ** 2


def step_expectation(guide: Guidance):
  """(c, rho): E[g z_step] = c grad + rho V V^T grad for g = z . grad (c = step_plain beta^2, 0 at
  alpha = 0), so the expected update of a step at rate lr is -(lr c grad + lr_V P_V grad)."""
  a, b = scales(guide)
  return (jnp.where(a > 0, guide.step_plain * guide.beta ** 2, 0.0),
          jnp.where(b > 0, guide.step_v, 0.0))

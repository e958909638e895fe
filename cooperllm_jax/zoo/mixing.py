"""ZGR's adaptive mixing: what the edge learns about the private gradient from the round's scalars.

The edge holds, for every probe p the clients ran, its scalar g_p and (from its address) its
subspace draw u_p. With the probe z = a v + b V u (zoo/guided.py) and central differences,

    g_p = b u_p . h + e_p,      h = V^T grad,      e_p = a v_p . grad + O(eps^2),

and e_p is independent of u_p with mean 0 and variance a^2 |grad|^2 (v ~ N(0, I) or Rademacher:
E[(v . x)^2] = |x|^2 either way). That is a linear regression of g on u with known design:

* h:        weighted least squares, b h_hat = A^-1 sum_p w_p u_p g_p, A = sum_p w_p u_p u_p^T.
            E[h_hat | u] = h exactly: unbiased, and free of the |h|^2 (u u^T - I) noise that the
            moment estimate mean(g u) / b carries. Its covariance is estimated with the
            heteroskedasticity-robust sandwich A^-1 (sum w_p^2 r_p^2 u_p u_p^T) A^-1 / k (r the
            residuals, k = sum w - tr(A^-1 B), B = sum w_p^2 u_p u_p^T; k = 1 - m/N for equal
            weights: HC1).
* |h|^2:    |h_hat|^2 - tr Cov(h_hat) (unbiased), standard error from
            Var |h_hat|^2 = 4 h^T S h + 2 tr S^2 (Gaussian h_hat, S its covariance).
* |grad|^2: sum_p w_p r_p^2 / (k a^2): E[sum w r^2 | u] = k a^2 |grad|^2 exactly for homoskedastic
            e (the exact degrees-of-freedom correction for weighted LS), standard error from the
            spread of the squared residuals. The amplification of the noise is 1 / a^2 =
            1 / (beta^2 alpha): the old estimate (E[g^2] - c |h|^2) / a^2
            multiplied it by c / a^2 = (1 - alpha) d / (m alpha) because the cloud part of every
            scalar was d/m times louder than the plain part.

With heterogeneous clients (each scalar from its own batch gradient grad_p) h_hat estimates the
weighted mean of V^T grad_p, and |grad|^2 the weighted mean of |grad_p|^2 plus (b/a)^2 times the
spread of V^T grad_p: the per-batch gradient energy, which is what the ZO noise scales with.
One-sided differences add eps/2 z^T H z to g: even in u, so h_hat stays unbiased, |grad|^2 gets an
O(eps^2) bias.

Everything here is a deterministic function of (scalars, addresses, weights, V's hyperparameters),
so every replay of the edge's decision is exact.

Across rounds the estimates are pooled by precision (`accumulate`): a round run at a large alpha
puts little energy into V, and its |V^T grad|^2 is ~(a/b)^2 times noisier, so an unweighted
average would let it swamp the informative rounds. The precision is the variance's at a value
fixed before the round (`pooling_weights`), never at the round's own estimate, whose standard error
grows with it. The weight on the step along V
(`adaptive_mixing`) is its one-step optimal shrinkage under the measured noise, so the step's
effective rate follows the signal-to-noise ratio of the scalars, which grows with the trained
dimension through |grad|^2 (the per-batch gradient's energy) even though the scales are d-free.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax.zoo import guided
from cooperllm_jax.zoo import keys as keys_lib


class Estimate(NamedTuple):
  """The private gradient as seen through one round's probes (float32 arrays)."""
  proj: jax.Array          # [m] h_hat = V^T grad (0 on unused basis slots)
  proj_cov: jax.Array      # [m, m] its estimated covariance
  proj_sq: jax.Array       # |V^T grad|^2, unbiased
  proj_sq_se: jax.Array    # its standard error
  grad_sq: jax.Array       # |grad|^2, unbiased
  grad_sq_se: jax.Array    # its standard error
  probes: jax.Array        # effective number of probes, (sum w)^2 / sum w^2


def subspace_draws(keys: jax.Array, m: int, distribution: str = 'gaussian') -> jax.Array:
  """u [N, m] of N probe keys: the same draws the clients used."""
  return jax.vmap(lambda k: guided.subspace_draw(k, m, distribution))(keys)


def regression(scalars, u, guide: guided.Guidance, weights=None) -> Estimate:
  """The estimates of the module docstring from scalars g [N], draws u [N, m] and probe weights
  [N] (None: equal; 0 drops a probe) under the guidance the probes used."""
  g = jnp.asarray(scalars, jnp.float32).reshape(-1)
  n = g.shape[0]
  w = jnp.ones(n, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
  w = w / jnp.maximum(w.sum(), 1e-30)
  a, b = guided.scales(guide)
  valid = guide.valid * (b > 0)
  m = valid.shape[0]
  u = jnp.asarray(u, jnp.float32).reshape(n, m) * valid
  pad = jnp.diag(1.0 - valid)                         # unused slots: h = 0, no degrees of freedom
  gram = jnp.einsum('p,pi,pj->ij', w, u, u) + pad
  gram_inv = jnp.linalg.inv(gram)
  coef = gram_inv @ (u.T @ (w * g))                   # b h_hat
  r = g - u @ coef
  b2 = jnp.einsum('p,pi,pj->ij', w * w, u, u)
  k = jnp.maximum(1.0 - jnp.trace(gram_inv @ b2), 1e-6)
  meat = jnp.einsum('p,pi,pj->ij', w * w * r * r, u, u)
  coef_cov = gram_inv @ meat @ gram_inv / k
  safe_b = jnp.where(b > 0, b, 1.0)
  proj = jnp.where(b > 0, coef / safe_b, 0.0) * valid
  cov = jnp.where(b > 0, coef_cov / safe_b ** 2, 0.0) * valid[:, None] * valid[None, :]
  tr, tr2, quad = jnp.trace(cov), jnp.sum(cov * cov), proj @ cov @ proj
  proj_sq = proj @ proj - tr
  proj_sq_se = jnp.sqrt(jnp.maximum(4.0 * quad - 2.0 * tr2, 2.0 * tr2))
  resid_var = jnp.sum(w * r * r) / k
  resid_var_var = jnp.sum(w * w * (r * r - resid_var) ** 2) / k ** 2
  a2 = jnp.maximum(a * a, 1e-30)
  return Estimate(proj, cov, proj_sq, proj_sq_se, resid_var / a2, jnp.sqrt(resid_var_var) / a2,
                  1.0 / jnp.maximum(jnp.sum(w * w), 1e-30))


def from_uplinks(uplinks, counts, guide: guided.Guidance, seed, distribution: str = 'gaussian'):
  """regression() over a round's uploads (zoo-level view of federated.clients.Uplink: addresses
  [C, S, P, 4], scalars and weights [C, S, P]) with FedAvg weights counts [C]."""
  m = guide.valid.shape[0]
  keys = keys_lib.address_keys(seed, jnp.asarray(uplinks.addresses).reshape(-1, 4))
  counts = jnp.asarray(counts, jnp.float32)
  w = (jnp.asarray(uplinks.weights, jnp.float32) *
       (counts / jnp.maximum(counts.sum(), 1e-30))[:, None, None]).reshape(-1)
  return regression(uplinks.scalars, subspace_draws(keys, m, distribution), guide, w)


class Pooled(NamedTuple):
  """accumulate()'s running sums (float32 scalars): w = sum decay^k w_k, x = sum decay^k w_k x_k,
  v = sum decay^2k w_k^2 se_k^2, so the pooled mean x / w has standard error sqrt(v) / w."""
  w: jax.Array
  x: jax.Array
  v: jax.Array

  @classmethod
  def empty(cls) -> 'Pooled':
    """Before any estimate (pooled() gives 0 with an infinite standard error)."""
    return cls(jnp.float32(0), jnp.float32(0), jnp.float32(0))


def accumulate(running: Pooled, estimate, se, weight, decay) -> Pooled:
  """Pools a round's estimate (standard error se) into `running` with weight `weight` and
  exponential forgetting `decay` (see Pooled).

  The weight must not depend on the round's own estimate: the standard errors of |V^T grad|^2 and
  |grad|^2 grow with the estimates themselves, so weighting by 1 / se^2 would favour the rounds
  that came out low and bias the pooled mean down (on BBC News LoRA it held |V^T grad|^2 near 0
  and switched the step along V off in most rounds). `pooling_weights` gives weights that do not.
  """
  return Pooled(w=decay * running.w + weight, x=decay * running.x + weight * estimate,
                v=decay ** 2 * running.v + jnp.square(weight * se))


def pooling_weights(estimate: Estimate, proj_sq_prior):
  """(weight of proj_sq, weight of grad_sq) of one round for `accumulate`: the inverse variance of
  each estimate at a value fixed before the round, not at the round's own estimate.

  |V^T grad|^2: Var = 4 h^T S h + 2 tr S^2 at the true h; with h^T S h taken as H tr S / m
  (isotropic) at H = max(proj_sq_prior, 0), the pooled estimate of the rounds before. |grad|^2:
  its relative variance is 2 / probes for Gaussian residuals, so the weight is the effective number
  of probes (its scale is common to every round)."""
  cov = estimate.proj_cov
  m = jnp.maximum(jnp.sum(jnp.diag(cov) > 0), 1)
  var = (4.0 * jnp.maximum(proj_sq_prior, 0.0) * jnp.trace(cov) / m + 2.0 * jnp.sum(cov * cov))
  return 1.0 / jnp.maximum(var, 1e-30), estimate.probes


def pooled(running: Pooled):
  """(mean, standard error) of accumulate()'s sums (0, inf before any estimate)."""
  seen = running.w > 0
  safe = jnp.where(seen, running.w, 1.0)
  return (jnp.where(seen, running.x / safe, 0.0),
          jnp.where(seen, jnp.sqrt(running.v) / safe, jnp.inf))


def adaptive_mixing(proj_sq, grad_sq, m, probes, alpha, probe_v=1.0, rate_curvature=1.0):
  """(weight, cloud_share): the factor on the step along V and H / G clipped to [0, 1] (logged),
  from the pooled |V^T grad|^2 = H and |grad|^2 = G; rate_curvature = lr_V L_V where the cloud
  measured the curvature L_V along V (1 where it did not).

  The step along V is -lr_V c V h_P with h_P the mean over the update's P probes of g u / b, an
  unbiased estimate of h = V^T grad whose noise is tr Cov = (m r G + (m + 1) H) / P,
  r = (a / b)^2 = alpha / ((1 - alpha) probe_v^2) (zoo/guided.py). Along V the loss falls by
  lr_V (c H - lr_V L_V c^2 (H + tr Cov) / 2) in expectation, which is largest at
  c* = H / (lr_V L_V (H + tr Cov)), clipped to [0, 1] (zgr.lr_v stays the largest rate); without a
  measured L_V, lr_V is taken on the scale of the curvature along V (lr_V L_V ~ 1: zgr.lr_v is
  then the step's rate with a noise-free estimate),

      c* = H / (H + (m r G + (m + 1) H) / P)        (H < 0 is taken as 0).

  With L_V measured the step's rate lr_V c* = min(lr_V, H / (L_V (H + tr Cov))) is the quadratic
  model's best under the noise, free of any tuned rate once lr_V is large: as the loss sharpens
  along V (L_V grows 1,600x on BBC News LoRA, docs/zgr.md) it shrinks by the noise too, where a
  cap at 1 / L_V alone (zgr.curvature_cap without adaptive) still lets noise dominate.

  A cloud whose subspace misses the private gradient (H ~ 0) gets c* ~ 0; one that holds it gets
  c* -> 1 as the probes' noise m r G / P falls below H. The noise grows with the trained
  dimension through G (on BBC News, MiniLM, G ~ 2.5 with LoRA, ~40 times H), which is why one
  fixed lr_V cannot serve a head and LoRA alike and this factor can: the effective rate
  lr_V c* follows the measured signal-to-noise ratio. The paper's lambda* = d sigma^2 /
  (d sigma^2 + |b|^2 + tau^2) weighs a biased cloud gradient against the ZO noise; the step along
  V here is the private gradient's own (unbiased) projection, so only its noise needs weighing.
  alpha stays the configured one: with the plain step independent of alpha, alpha only trades the
  plain estimate's noise against the V estimate's, weighted by curvatures the edge does not know.
  """
  h2 = jnp.maximum(proj_sq, 0.0)
  r = alpha / ((1.0 - alpha) * probe_v ** 2)
  noise = (m * r * grad_sq + (m + 1) * h2) / probes
  weight = jnp.minimum(h2 / jnp.maximum(rate_curvature * (h2 + noise), 1e-30), 1.0)
  rho2 = jnp.clip(proj_sq / jnp.maximum(grad_sq, 1e-30), 0.0, 1.0)
  return weight, rho2

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
            1 / (beta^2 alpha), bounded by 1 / alpha_min: the old estimate (E[g^2] - c |h|^2) / a^2
            multiplied it by c / a^2 = (1 - alpha) d / (m alpha) because the cloud part of every
            scalar was d/m times louder than the plain part.

With heterogeneous clients (each scalar from its own batch gradient grad_p) h_hat estimates the
weighted mean of V^T grad_p, and |grad|^2 the weighted mean of |grad_p|^2 plus (b/a)^2 times the
spread of V^T grad_p: the per-batch gradient energy, which is what the ZO noise scales with.
One-sided differences add eps/2 z^T H z to g: even in u, so h_hat stays unbiased, |grad|^2 gets an
O(eps^2) bias.

Everything here is a deterministic function of (scalars, addresses, weights, V's hyperparameters),
so every replay of the edge's decision is exact.

The rule for alpha (`adaptive_mixing`), derived in its docstring, trades the plain part's progress
against the subspace step's, and shrinks the step along V by the one-step optimal factor
|h|^2 / (|h|^2 + noise): a cloud whose subspace does not hold the private gradient (|h|^2 ~ 0) gets
alpha -> alpha_max and weight -> 0.
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


def adaptive_mixing(grad_sq, proj_sq, m, probes, step_v, beta=1.0, probe_v=1.0,
                    lo: float = 0.05, hi: float = 0.95, grid: int = 91):
  """(alpha, weight, cloud_share): the next round's probe share and the factor on the step along V.

  Model (per step of P probes, rates lr and lr_V = step_v lr, |grad|^2 = G, rho^2 = |h|^2 / G the
  cloud subspace's share of the private gradient, clipped to [0, 1]):
    plain part:  expected decrease lr a^2 G = lr beta^2 alpha G (its noise is at most plain ZO's,
                 which lr already keeps stable);
    V part:      the step -lr_V c V h_hat_P with h_hat_P the P-probe mean of g u / b, whose noise
                 is tr Cov = (m (a/b)^2 G + (m + 1) |h|^2) / P = T(alpha) G / P; with the rate at
                 the stability limit (lr_V L_V = 1) the expected decrease
                 lr_V (c |h|^2 - c^2 (|h|^2 + tr Cov) / 2) is largest at
                 c* = rho^2 / (rho^2 + T / P), and is then lr_V G rho^4 / (2 (rho^2 + T / P)).
  alpha maximizes the sum, beta^2 alpha / step_v + rho^4 / (2 (rho^2 + T(alpha) / P)), over a grid
  on [lo, hi] (deterministic), and weight = c*(alpha). The paper's lambda* = d sigma^2 /
  (d sigma^2 + |b|^2 + tau^2) weighs a biased cloud gradient against ZO noise; here the step along V
  is the private gradient's own (unbiased) projection, so what a misleading cloud costs is probe
  energy and the noise of a step along directions that do not descend: rho -> 0 gives c* -> 0 and
  alpha -> hi, rho -> 1 with step_v >> 1 (lr_V >> lr, large d) gives alpha -> lo and c* -> 1 as P
  grows.
  """
  rho2 = jnp.clip(proj_sq / jnp.maximum(grad_sq, 1e-30), 0.0, 1.0)
  alphas = jnp.linspace(lo, hi, grid, dtype=jnp.float32)
  ratio = alphas / ((1.0 - alphas) * probe_v ** 2)                   # (a / b)^2
  noise = (m * ratio + (m + 1) * rho2) / probes
  value = beta ** 2 * alphas / jnp.maximum(step_v, 1e-30) + rho2 ** 2 / (
      2.0 * jnp.maximum(rho2 + noise, 1e-30))
  i = jnp.argmax(value)
  alpha = alphas[i]
  weight = rho2 / jnp.maximum(rho2 + noise[i], 1e-30)
  return alpha, weight, rho2

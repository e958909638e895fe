"""Synthetic problems with a known gradient for the ZGR dimension tests
(tests/test_zgr_dimensions.py, experiments/bench/zgr_dimensions.py): a separable quadratic and an
L2-regularized logistic regression with a block-diagonal design, both over one trainable leaf
{'q': {'w': [d]}}, so any d up to 1e7 fits in a few float32 vectors. The data travel as the
estimators' `batch` (traced, not baked into the compiled code), and sums over d run in two stages
(blocks of 1000, then the block sums), as a model's mean over tokens would: a one-pass float32 sum
of 1e7 terms would round the loss, and so the finite differences, far more coarsely than any real
forward pass does."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax.models.common import hook
from cooperllm_jax.zoo import guided


def _sum(x):
  """A two-stage float32 sum (blocks of 1000 where the size allows)."""
  x = x.reshape(-1)
  if x.size % 1000 == 0 and x.size > 1000:
    return jnp.sum(jnp.sum(x.reshape(-1, 1000), axis=1))
  return jnp.sum(x)


@dataclasses.dataclass
class Problem:
  name: str
  d: int
  data: dict            # the estimators' batch
  value: Callable       # value(w [d], data) -> float32, jittable
  grad: Callable        # grad(w [d], data) -> float32 [d], closed form, jittable
  value64: Callable     # value64(w) -> float, numpy float64 (for reporting)
  grad64: Callable      # grad64(w) -> float64 [d] (the truth the estimates are checked against)
  w0: jax.Array
  optimum: float        # min of value (float64)
  curvature: float      # L, an upper bound on the Hessian's eigenvalues

  def loss(self, params, batch, perturb):
    return self.value(hook(perturb, 'q', params['q'])['w'], batch)

  def gap(self, w) -> float:
    """(f(w) - f*) / (f(w0) - f*) in float64."""
    w0 = np.asarray(self.w0, np.float64)
    return (self.value64(np.asarray(w, np.float64)) - self.optimum) / (self.value64(w0) -
                                                                        self.optimum)


def quadratic(d: int, seed: int = 0) -> Problem:
  """0.5 sum_i lam_i (w_i - t_i)^2, lam ~ U(0.5, 2), t ~ N(0, 1), from w0 = 0."""
  rng = np.random.default_rng(seed)
  lam64, t64 = rng.uniform(0.5, 2.0, d), rng.standard_normal(d)
  data = {'lam': jnp.asarray(lam64, jnp.float32), 't': jnp.asarray(t64, jnp.float32)}
  value = lambda w, b: 0.5 * _sum(b['lam'] * (w - b['t']) ** 2)
  grad = lambda w, b: b['lam'] * (w - b['t'])
  return Problem('quadratic', d, data, value, grad,
                 lambda w: 0.5 * float(np.sum(lam64 * (w - t64) ** 2)),
                 lambda w: lam64 * (w - t64), jnp.zeros(d, jnp.float32), 0.0, 2.0)


def logistic(d: int, seed: int = 0, block: int = 10, mu: float = 0.3) -> Problem:
  """sum_i softplus(-y_i <x_i, W_i>) + mu/2 |W|^2: n = d / block examples, example i with features
  x_i ~ N(0, 4 I / block) on its own block W_i of the weights (a block-diagonal design), labels
  +-1; from w0 = 0. Its minimum lies in span(x_i) per block: a 1-D Newton solve each (float64)."""
  assert d % block == 0
  n = d // block
  rng = np.random.default_rng(seed)
  x64 = 2.0 * rng.standard_normal((n, block)) / np.sqrt(block)
  y64 = rng.choice([-1.0, 1.0], n)
  data = {'x': jnp.asarray(x64, jnp.float32), 'y': jnp.asarray(y64, jnp.float32)}

  def value(w, b):
    s = jnp.sum(b['x'] * w.reshape(n, block), axis=1)
    return _sum(jax.nn.softplus(-b['y'] * s)) + 0.5 * mu * _sum(w * w)

  def grad(w, b):
    s = jnp.sum(b['x'] * w.reshape(n, block), axis=1)
    return (-(b['y'] * jax.nn.sigmoid(-b['y'] * s))[:, None] * b['x']).reshape(-1) + mu * w

  def value64(w):
    s = np.sum(x64 * w.reshape(n, block), axis=1)
    return float(np.sum(np.logaddexp(0.0, -y64 * s)) + 0.5 * mu * np.sum(w * w))

  def grad64(w):
    s = np.sum(x64 * w.reshape(n, block), axis=1)
    return (-(y64 / (1.0 + np.exp(y64 * s)))[:, None] * x64).reshape(-1) + mu * w

  q = np.sum(x64 * x64, axis=1)      # W_i = c_i x_i: minimize softplus(-y c q) + mu c^2 q / 2
  c = np.zeros(n)
  for _ in range(50):
    sig = 1.0 / (1.0 + np.exp(y64 * c * q))     # sigmoid(-y c q)
    c -= (-y64 * q * sig + mu * c * q) / (q * q * sig * (1 - sig) + mu * q)
  optimum = float(np.sum(np.logaddexp(0.0, -y64 * c * q) + 0.5 * mu * c * c * q))
  return Problem('logistic', d, data, value, grad, value64, grad64, jnp.zeros(d, jnp.float32),
                 optimum, float(0.25 * q.max() + mu))


PROBLEMS = {'quadratic': quadratic, 'logistic': logistic}


def cloud_basis(grad, m: int, cos: float = 0.8, seed: int = 1):
  """An orthonormal basis [d, m] (float64 numpy) whose first vector has cosine `cos` with grad and
  whose others are random: a cloud whose subspace holds ~cos^2 of the gradient's energy."""
  grad = np.asarray(grad, np.float64)
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((grad.size, m))
  g = grad / np.linalg.norm(grad)
  n0 = noise[:, 0] - (noise[:, 0] @ g) * g
  first = cos * g + np.sqrt(1 - cos ** 2) * n0 / np.linalg.norm(n0)
  q, _ = np.linalg.qr(np.concatenate([first[:, None], noise[:, 1:]], 1))
  return q * np.sign(q[:, :1].T @ first)


def guidance(basis, alpha, **kw):
  """A Guidance over the problems' tree from a [d, m] basis."""
  basis = jnp.asarray(np.asarray(basis).T, jnp.float32)
  return guided.make_guidance({'q': {'w': basis}}, jnp.ones(basis.shape[0]), alpha, **kw)

"""ZGR's guided perturbations and the cloud's direction pool.

- alpha = 1 (or an empty basis) is the plain ZO direction bit for bit;
- the layer/row hooks draw exactly the bits of the whole-leaf guided direction;
- on a quadratic, the probe's covariance is beta^2 (alpha I + (1 - alpha) s^2 V V^T) (d-free), the
  mean of g z is that times grad and the mean of the update direction g z_step is
  beta^2 alpha grad + rho V V^T grad, and the same bounds reject the old (d/m-scaled) and the
  paper's (1/d-scaled) forms, the unguided mean and a sign flip;
- the pool's QR basis is orthonormal, spans the newest directions and drops dependent ones;
- a guided client's update is replayed bit for bit by the edge.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax import zoo
from cooperllm_jax.cloud import pool as pool_lib
from cooperllm_jax.federated import clients as fzo
from cooperllm_jax.models import Encoder, EncoderConfig
from cooperllm_jax.models.common import hook, make_loss
from cooperllm_jax.models.spec import is_spec
from cooperllm_jax.zoo import guided, mixing
from helpers import Q_D, flat, quadratic_loss, quadratic_setup, t_test_rejects

N = 8192


def _random_pool(shapes_tree, m, filled, seed=0):
  rng = np.random.default_rng(seed)
  dirs = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal((m,) + x.shape), jnp.float32),
                      shapes_tree)
  return pool_lib.Pool(dirs, jnp.int32(filled))


@pytest.fixture(scope='module')
def quadratic():
  return quadratic_setup()[:3]


def _guide(trainable, m, alpha, beta=1.0, filled=None, seed=0, probe_v=1.0, step_v=1.0,
           step_plain=1.0):
  basis, valid = pool_lib.orthonormalize(_random_pool(trainable, m, m if filled is None else filled,
                                                      seed))
  return guided.make_guidance(basis, valid, alpha, beta, probe_v, step_v, step_plain)


def _tree_z(key, tree, distribution, guide, step=False):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: guided.direction(key, p, x.shape, None, distribution, guide, step), tree)


@pytest.mark.parametrize('distribution', zoo.keys.DISTRIBUTIONS)
def test_alpha_one_and_empty_basis_are_the_plain_direction_bitwise(quadratic, distribution):
  trainable = quadratic[0]
  key = zoo.address_key(3, (1, 2, 0, 1))
  plain = zoo.tree_direction(key, trainable, distribution)
  for guide in (_guide(trainable, 2, 1.0, step_v=7.0), _guide(trainable, 2, 0.3, filled=0)):
    for step in (False, True):   # the probe and the update direction
      z = _tree_z(key, trainable, distribution, guide, step)
      for x, y in zip(jax.tree.leaves(z), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # alpha < 1 does change it.
  z = _tree_z(key, trainable, distribution, _guide(trainable, 2, 0.5))
  assert not np.array_equal(flat(z), flat(plain))


@pytest.mark.parametrize('distribution', ['gaussian', 'gaussian_hash'])
def test_slices_of_guided_direction_equal_the_whole_leaf_bitwise(distribution):
  shapes = {'layers': {'w': jnp.zeros((5, 3, 4))}, 'embed': {'token': jnp.zeros((7, 6))}}
  guide = _guide(shapes, 3, 0.4, beta=1.5, seed=2)
  key = zoo.address_key(0, (4, 1, 2, 0))
  whole = guided.direction(key, ('layers', 'w'), (5, 3, 4), None, distribution, guide)
  for layer in range(5):
    part = guided.direction(key, ('layers', 'w'), (3, 4), jnp.int32(layer), distribution, guide)
    np.testing.assert_array_equal(np.asarray(part), np.asarray(whole[layer]))
  ids = jnp.array([[6, 0], [3, 3]], jnp.int32)
  rows = guided.direction(key, ('embed', 'token'), (6,), ids, distribution, guide)
  table = guided.direction(key, ('embed', 'token'), (7, 6), None, distribution, guide)
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(table)[np.asarray(ids)])


def _guided_samples(est, trainable, batch, guide, n):
  estimate = zoo.make_estimate(quadratic_loss, est)

  def one(key):
    g, _ = estimate(trainable, {}, batch, key[None], guide)
    return (g[0], flat(_tree_z(key, trainable, est.distribution, guide)),
            flat(_tree_z(key, trainable, est.distribution, guide, step=True)))

  addrs = jnp.stack([jnp.zeros(n, jnp.int32)] * 3 + [jnp.arange(n, dtype=jnp.int32)], -1)
  return jax.jit(jax.vmap(one))(zoo.address_keys(0, addrs))


@pytest.mark.parametrize('alpha,m,distribution,probe_v,c', [(0.5, 2, 'gaussian', 1.0, 1.0),
                                                            (0.0, 1, 'gaussian', 1.0, 1.0),
                                                            (0.25, 3, 'rademacher', 2.0, 0.4)])
def test_guided_estimate_is_unbiased_for_the_documented_scaling(quadratic, alpha, m, distribution,
                                                                probe_v, c):
  """c: the plain step's rate as a share of lr (step_plain; cooperllm's trace cap sets it)."""
  trainable, batch, grad = quadratic
  beta, rho = 0.8, 3.0
  guide = _guide(trainable, m, alpha, beta, seed=m, probe_v=probe_v, step_v=rho, step_plain=c)
  est = zoo.Estimator(eps=0.05, probes=1, distribution=distribution)
  g, z, zs = (np.asarray(x, np.float64) for x in _guided_samples(est, trainable, batch, guide, N))
  np.testing.assert_allclose(g, z @ grad, rtol=0, atol=2e-4 * np.linalg.norm(grad) * 10)

  v = np.stack([np.asarray(flat(jax.tree.map(lambda x, j=j: x[j], guide.basis)))
                for j in range(m)], 1)                                    # [d, m]
  np.testing.assert_allclose(v.T @ v, np.eye(m), atol=1e-5)
  proj = v @ v.T
  cov = beta ** 2 * (alpha * np.eye(Q_D) + (1 - alpha) * probe_v ** 2 * proj)
  np.testing.assert_allclose(np.cov(z.T, bias=True) + np.outer(z.mean(0), z.mean(0)), cov,
                             atol=0.15 * beta ** 2 * max(1, probe_v ** 2))
  a2, b2 = (float(x) for x in guided.covariance_diag_and_subspace(guide))
  np.testing.assert_allclose([a2, b2], [beta ** 2 * alpha, beta ** 2 * (1 - alpha) * probe_v ** 2],
                             rtol=1e-6)
  expect = cov @ grad
  ghat = g[:, None] * z
  mean, se = ghat.mean(0), ghat.std(0, ddof=1) / math.sqrt(N)
  t = (mean - expect) / se
  assert not t_test_rejects(mean, se, expect), (np.abs(t).max(), (t ** 2).sum())
  # Power: the old d/m-scaled form, the paper's normalization (1/d shrink), the plain gradient and
  # a sign flip are all rejected by the same bound (where they differ from ours: at alpha = 0,
  # m = 1, s = 1 the paper's form is ours).
  old = beta ** 2 * (alpha * np.eye(Q_D) + (1 - alpha) * Q_D / m * proj) @ grad
  paper = beta ** 2 * (alpha / Q_D * np.eye(Q_D) + (1 - alpha) / m * proj) @ grad
  for wrong in (old, paper, beta ** 2 * grad, -expect):
    if np.linalg.norm(wrong - expect) > 0.1 * np.linalg.norm(expect):
      assert t_test_rejects(mean, se, wrong)

  # The update direction: E[g z_step] = c beta^2 grad + rho V V^T grad (MeZO's step at the plain
  # rate c lr whatever alpha, plus a first-order step at rate rho lr = lr_V along the projection).
  c_s, rho_s = (float(x) for x in guided.step_expectation(guide))
  expect_step = c * beta ** 2 * (alpha > 0) * grad + (rho if alpha < 1 else 0.0) * proj @ grad
  np.testing.assert_allclose([c_s, rho_s], [c * beta ** 2 * (alpha > 0), rho * (alpha < 1)],
                             rtol=1e-6)
  shat = g[:, None] * zs
  mean, se = shat.mean(0), shat.std(0, ddof=1) / math.sqrt(N)
  assert not t_test_rejects(mean, se, expect_step)
  # The form before (plain step alpha times MeZO's), no subspace step, the plain step uncapped, a
  # sign flip: rejected.
  for wrong in (expect, beta ** 2 * alpha * grad + rho * proj @ grad, beta ** 2 * grad,
                beta ** 2 * grad + rho * proj @ grad, -expect_step):
    if np.linalg.norm(wrong - expect_step) > 0.1 * np.linalg.norm(expect_step):
      assert t_test_rejects(mean, se, wrong)


def test_pool_basis_is_orthonormal_spans_newest_and_drops_dependent_directions():
  shapes = {'a': jnp.zeros((3, 4)), 'b': jnp.zeros((5,))}
  pool = pool_lib.empty_pool(shapes, 3)
  rng = np.random.default_rng(0)
  d1 = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), shapes)
  d2 = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), shapes)
  pool = pool_lib.push(pool, d1)
  basis, valid = pool_lib.orthonormalize(pool)
  np.testing.assert_array_equal(valid, [1, 0, 0])
  pool = pool_lib.push(pool, d2)
  pool = pool_lib.push(pool, jax.tree.map(lambda x, y: 2 * x - 3 * y, d1, d2))  # dependent
  basis, valid = pool_lib.orthonormalize(pool)
  np.testing.assert_array_equal(valid, [1, 1, 0])
  vecs = [np.concatenate([np.ravel(x[j]) for x in jax.tree.leaves(basis)]) for j in range(3)]
  gram = np.array([[a @ b for b in vecs] for a in vecs])
  np.testing.assert_allclose(gram, np.diag([1, 1, 0]), atol=1e-5)
  # The newest direction is basis vector 0 (its sign and scale aside), and d1 lies in the span.
  newest = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
      jax.tree.map(lambda x, y: 2 * x - 3 * y, d1, d2))])
  np.testing.assert_allclose(abs(vecs[0] @ newest), np.linalg.norm(newest), rtol=1e-5)
  f1 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(d1)])
  coords = np.stack(vecs) @ f1
  np.testing.assert_allclose(coords @ np.stack(vecs), f1, atol=1e-4)
  # A full pool drops the oldest direction.
  assert int(pool_lib.push(pool, d1).filled) == 3


CFG = EncoderConfig(vocab_size=97, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_positions=16, num_labels=3, type_vocab_size=0, pooling='mean')


@pytest.mark.parametrize('mode,distribution', [('full', 'gaussian'), ('head', 'gaussian'),
                                               ('full', 'gaussian_hash')])
def test_guided_client_update_is_replayed_bitwise(mode, distribution):
  model = Encoder(CFG)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32),
                        model.specs(), is_leaf=is_spec)
  subset = zoo.Subset(mode)
  trainable, frozen = subset.split(params)
  guide = _guide(trainable, 2, 0.5, seed=1)
  est = zoo.Estimator(eps=1e-2, probes=2, distribution=distribution)
  client = jax.jit(fzo.make_client_update(make_loss(model), est, subset))
  ids = rng.integers(1, CFG.vocab_size, (3, 4, 8)).astype(np.int32)
  batches = {'input_ids': ids, 'attention_mask': np.ones_like(ids),
             'labels': rng.integers(0, 3, (3, 4)).astype(np.int32)}
  local, up, _ = client(trainable, frozen, batches, 7, 2, 5, 1e-2, guide)
  coefs = zoo.coefficients(1e-2, up.scalars, up.weights).reshape(-1)
  replay = jax.jit(zoo.replay, static_argnames='distribution')
  replayed = replay(trainable, 7, up.addresses.reshape(-1, 4), coefs, distribution, guide)
  for x, y in zip(jax.tree.leaves(replayed), jax.tree.leaves(local)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Replaying without the guidance (or with another basis) does not reproduce the client.
  for other in (None, _guide(trainable, 2, 0.5, seed=9)):
    r = replay(trainable, 7, up.addresses.reshape(-1, 4), coefs, distribution, other)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(r),
                                                        jax.tree.leaves(local)))


def test_guided_steps_descend_far_faster_than_plain_zo_on_a_large_quadratic():
  """The mechanism behind the paper's speed-up: with d = 2000 and a cloud direction that agrees
  with the private gradient (cos ~ 0.8), 40 guided steps (the plain part at the plain-stable rate,
  the step along V at the default first-order rate DEFAULT_LR_V) cut the loss many times more than
  40 plain ZO steps. A useless direction (orthogonal to every step's gradient) at those fixed
  weights is a pure random walk along V (no restoring force: h = 0 at every step) and raises the
  loss; the adaptive mixing (zoo/mixing.py), given the cloud's share (0 here), takes the step
  along V away, and the loss still descends."""
  d, steps = 2000, 40
  rng = np.random.default_rng(0)
  lam = jnp.asarray(rng.uniform(0.5, 2.0, d), jnp.float32)
  target = jnp.asarray(rng.standard_normal(d), jnp.float32)
  cloud_noise = jnp.asarray(rng.standard_normal(d), jnp.float32)

  def loss(params, batch, perturb):
    w = hook(perturb, 'q', params['q'])['w']
    return 0.5 * jnp.sum(lam * (w - target) ** 2)

  step = zoo.make_zo_step(loss, zoo.Estimator(eps=1e-3))
  lr = 0.5 / (d + 2) / 2.0                         # plain ZO-SGD's stable rate: 1 / ((d + 2) L)

  step_v = guided.step_ratio(guided.DEFAULT_LR_V, lr)

  def run(alpha, cloud, weight=1.0):
    def body(t, s):
      grad = lam * (t['q']['w'] - target)
      direction = cloud(grad)
      basis = {'q': {'w': (direction / jnp.linalg.norm(direction))[None]}}
      guide = guided.make_guidance(basis, jnp.ones(1), alpha, step_v=weight * step_v)
      t, _, l = step(t, {}, None, zoo.address_key(0, (s, 0, 0, 0))[None], lr, guide)
      return t, l

    t0 = {'q': {'w': jnp.zeros(d, jnp.float32)}}
    t, _ = jax.lax.scan(body, t0, jnp.arange(steps))
    return float(loss(t, None, None)) / float(loss(t0, None, None))

  informed = lambda g: g + 0.75 * jnp.linalg.norm(g) / jnp.sqrt(d) * cloud_noise   # cos ~ 0.8
  plain, guided_ratio = run(1.0, informed), run(0.5, informed)
  orthogonal = lambda g: cloud_noise - (cloud_noise @ g) / (g @ g) * g
  useless_fixed = run(0.5, orthogonal)
  weight, _ = mixing.adaptive_mixing(0.0, 1.0, 1, 1, 0.5)   # |V^T grad|^2 = 0
  alpha = 0.5
  useless = run(alpha, orthogonal, weight)
  print(f"loss ratio after {steps} steps: plain {plain:.4f}, guided {guided_ratio:.4f}, useless "
        f"{useless_fixed:.4f} (fixed weights), {useless:.4f} (adaptive: alpha {float(alpha):.2f}, "
        f"weight {float(weight):.2f})")
  assert plain > 0.95, plain                           # 40 plain steps barely move
  assert guided_ratio < 0.2, guided_ratio              # guided: a large cut
  assert float(weight) == 0.0
  assert useless < 1.0, useless                        # a useless cloud, weighed out: descends

"""ZGR at real dimensions (issue 15), on synthetic problems with a known gradient
(experiments/bench/zgr_problems.py: a quadratic and an L2-regularized logistic regression) at
d = 1e3, 1e5 and 1e7:

- the edge's regression estimates (zoo/mixing.py) of |V^T grad|^2 and |grad|^2, from the scalars the
  guided SPSA probes produce (zoo.make_estimate), are within 10% of the truth and within 4 of their
  own standard errors, and those standard errors are honest: a nominal 95% interval covers the truth
  in 90-99% of repeated seeds;
- the adaptive mixing weighs out a cloud whose subspace misses the private gradient;
- one set of default guided hyperparameters (alpha 0.5, beta 1, probe_v 1, lr_V = DEFAULT_LR_V,
  eps 1e-2) converges at every d, far ahead of plain ZO at equal probes and the same plain rate;
- a bfloat16-stored leaf accumulates sub-ulp updates through the float32 master.

Everything is checked against the closed-form gradient (float64), never against the code's own
formulas. d = 1e7 draws 1e7 normals per probe (~0.2 s on one CPU core), so it runs few probes: the
estimates there are checked against their standard errors; the 10% figures at 1e7 come from
experiments/bench/zgr_dimensions.py (more probes).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax import zoo
from cooperllm_jax.federated import clients as fzo
from cooperllm_jax.models.common import hook
from cooperllm_jax.zoo import guided, mixing
from experiments.bench.zgr_problems import PROBLEMS, cloud_basis, guidance

EPS = 1e-2
ALPHA = 0.5          # the default guided mixing
ALPHA_EST = 0.25     # the estimates' probes (what the adaptive rule picks for a good cloud)
M = 2


def _keys(n, rep=0, step=0):
  addrs = jnp.stack([jnp.full(n, step, jnp.int32), jnp.zeros(n, jnp.int32),
                     jnp.full(n, rep, jnp.int32), jnp.arange(n, dtype=jnp.int32)], -1)
  return zoo.address_keys(0, addrs)


def _scalars(pb, guide, keys):
  """The guided SPSA scalars of probes `keys` at w0 (central differences, float32)."""
  estimate = zoo.make_estimate(pb.loss, zoo.Estimator(eps=EPS))
  f = jax.jit(lambda w, data, guide, keys: estimate({'q': {'w': w}}, {}, data, keys, guide)[0])
  return f(pb.w0, pb.data, guide, keys)


def _setup(name, d, cos=0.8):
  pb = PROBLEMS[name](d)
  grad = pb.grad64(np.asarray(pb.w0, np.float64))
  basis = cloud_basis(grad, M, cos)
  guide = guidance(basis, ALPHA_EST)
  v = np.asarray(guide.basis['q']['w'], np.float64).T          # the float32 basis the probes use
  h = v.T @ grad
  return pb, guide, h, float(grad @ grad)


@pytest.mark.parametrize('name', ['quadratic', 'logistic'])
@pytest.mark.parametrize('d,n', [(10 ** 3, 4096), (10 ** 5, 2048)])
def test_estimates_are_within_ten_percent_of_the_true_gradient(name, d, n):
  pb, guide, h, grad_sq = _setup(name, d)
  keys = _keys(n)
  e = mixing.regression(_scalars(pb, guide, keys), mixing.subspace_draws(keys, M), guide)
  proj_sq = float(h @ h)
  print(f'{name} d={d} N={n}: |V^T g|^2 {float(e.proj_sq):.4g} +- {float(e.proj_sq_se):.3g} '
        f'(true {proj_sq:.4g}), |g|^2 {float(e.grad_sq):.4g} +- {float(e.grad_sq_se):.3g} '
        f'(true {grad_sq:.4g})')
  for est, se, true in ((e.proj_sq, e.proj_sq_se, proj_sq), (e.grad_sq, e.grad_sq_se, grad_sq)):
    assert abs(float(est) - true) < 0.1 * true
    assert abs(float(est) - true) < 4 * float(se)
    assert float(se) < 0.05 * true               # the stated N gives 10% at >= 2 SE
  z = (np.asarray(e.proj) - h) / np.sqrt(np.diag(np.asarray(e.proj_cov)))
  assert np.all(np.abs(z) < 4), z


def test_estimates_at_ten_million_weights_are_consistent():
  """d = 1e7 (few probes): the float32 finite differences through a 1e7-weight forward still give
  estimates within 4 SE of the truth, with SEs of the size the theory gives for N probes."""
  pb, guide, h, grad_sq = _setup('quadratic', 10 ** 7)
  n = 48
  keys = _keys(n)
  e = mixing.regression(_scalars(pb, guide, keys), mixing.subspace_draws(keys, M), guide)
  proj_sq = float(h @ h)
  print(f'quadratic d=1e7 N={n}: |V^T g|^2 {float(e.proj_sq):.4g} +- {float(e.proj_sq_se):.3g} '
        f'(true {proj_sq:.4g}), |g|^2 {float(e.grad_sq):.4g} +- {float(e.grad_sq_se):.3g} '
        f'(true {grad_sq:.4g})')
  assert abs(float(e.proj_sq) - proj_sq) < 4 * float(e.proj_sq_se)
  assert abs(float(e.grad_sq) - grad_sq) < 4 * float(e.grad_sq_se)
  # Theory: SE(|g|^2) ~ sqrt(2 / N) |g|^2; SE(|h|^2) ~ 2 (a / b) |g| |h| / sqrt(N).
  assert 0.5 < float(e.grad_sq_se) / (math.sqrt(2 / n) * grad_sq) < 2
  ab = math.sqrt(ALPHA_EST / (1 - ALPHA_EST))
  assert 0.5 < float(e.proj_sq_se) / (2 * ab * math.sqrt(grad_sq * proj_sq / n)) < 2


@pytest.mark.parametrize('name', ['quadratic', 'logistic'])
def test_standard_errors_are_honest(name):
  """Over 400 seeds of N = 256 probes each (d = 1e3), the nominal 95% intervals est +- 1.96 SE
  cover the true |V^T grad|^2, |grad|^2 and each coordinate of V^T grad 90-99% of the time."""
  reps, n = 400, 256
  pb, guide, h, grad_sq = _setup(name, 10 ** 3)
  keys = jax.vmap(lambda r: _keys(n, rep=r))(jnp.arange(reps))
  g = _scalars(pb, guide, keys.reshape(-1)).reshape(reps, n)
  u = mixing.subspace_draws(keys.reshape(-1), M).reshape(reps, n, M)
  e = jax.vmap(lambda g, u: mixing.regression(g, u, guide))(g, u)
  cover = {
      'proj_sq': np.abs(np.asarray(e.proj_sq) - h @ h) <= 1.96 * np.asarray(e.proj_sq_se),
      'grad_sq': np.abs(np.asarray(e.grad_sq) - grad_sq) <= 1.96 * np.asarray(e.grad_sq_se)}
  se = np.sqrt(np.diagonal(np.asarray(e.proj_cov), axis1=1, axis2=2))
  for j in range(M):
    cover[f'proj_{j}'] = np.abs(np.asarray(e.proj)[:, j] - h[j]) <= 1.96 * se[:, j]
  rates = {k: float(v.mean()) for k, v in cover.items()}
  print(name, 'coverage of nominal 95%:', rates)
  for k, rate in rates.items():
    assert 0.90 <= rate <= 0.99, (k, rate)
  # Unbiased: the mean over seeds is within 4 standard errors of the truth.
  for est, true in ((e.proj_sq, h @ h), (e.grad_sq, grad_sq)):
    est = np.asarray(est)
    assert abs(est.mean() - true) < 4 * est.std() / math.sqrt(reps)


def test_estimates_from_a_rounds_uplinks_with_fedavg_weights():
  """mixing.from_uplinks over three clients' uplinks (federated.clients' client update, lr = 0 so the
  gradient stays the truth's; unequal FedAvg weights): the weighted regression stays unbiased and
  within 4 SE of the truth."""
  pb, guide, h, grad_sq = _setup('quadratic', 10 ** 3)
  steps, probes = 64, 4
  client = jax.jit(fzo.make_client_update(pb.loss, zoo.Estimator(eps=EPS, probes=probes)))
  batches = jax.tree.map(lambda x: jnp.broadcast_to(x, (steps,) + x.shape), pb.data)
  ups = [client({'q': {'w': pb.w0}}, {}, batches, 0, 1, c, 0.0, guide)[1] for c in range(3)]
  uplinks = jax.tree.map(lambda *xs: jnp.stack(xs), *ups)
  e = mixing.from_uplinks(uplinks, jnp.array([1.0, 2.0, 5.0]), guide, 0)
  assert float(e.probes) < 3 * steps * probes                    # unequal weights: fewer effective
  for est, se, true in ((e.proj_sq, e.proj_sq_se, h @ h), (e.grad_sq, e.grad_sq_se, grad_sq)):
    assert abs(float(est) - true) < 4 * float(se) and float(se) < 0.1 * true


def test_adaptive_mixing_weighs_out_a_cloud_that_misses_the_gradient():
  """From the probes' estimates alone (one round of 1024 probes): a cloud holding ~64% of the
  private gradient keeps most of the step along V, one orthogonal to it ~none; the weight is the
  one-step optimal shrinkage H / (H + (m r G + (m + 1) H) / P), checked at known (H, G)."""
  d, n = 10 ** 3, 1024
  out = {}
  for cos in (0.8, 0.0):
    pb, guide, h, grad_sq = _setup('quadratic', d, cos=cos)
    keys = _keys(n)
    e = mixing.regression(_scalars(pb, guide, keys), mixing.subspace_draws(keys, M), guide)
    out[cos] = [float(x) for x in mixing.adaptive_mixing(e.proj_sq, e.grad_sq, M, 4, ALPHA)]
  print('adaptive (weight, share):', out)
  (weight_good, share_good), (weight_bad, share_bad) = out[0.8], out[0.0]
  assert abs(share_good - 0.64) < 0.1 and share_bad < 0.05
  assert weight_good > 0.3 and weight_bad < 0.05          # 0.39 at the true share, P = 4
  # Known inputs: H = 0.64, G = 1, m = 2, P = 4, alpha 0.5 (r = 1): 0.64 / (0.64 + (2 + 3 * 0.64) / 4).
  weight, _ = mixing.adaptive_mixing(0.64, 1.0, 2, 4, 0.5)
  assert float(weight) == pytest.approx(0.64 / (0.64 + (2 + 3 * 0.64) / 4), rel=1e-6)
  # Noise grows with G (the trained dimension's batch-gradient energy): the weight falls.
  assert float(mixing.adaptive_mixing(0.08, 2.5, 1, 4, 0.5)[0]) < 0.15
  assert float(mixing.adaptive_mixing(-0.1, 1.0, 1, 4, 0.5)[0]) == 0.0       # H < 0 counts as 0
  # A measured curvature along V scales it by 1 / (lr_V L_V), at most 1: the rate lr_V c* is then
  # H / (L_V (H + tr Cov)) whatever lr_V above it.
  assert float(mixing.adaptive_mixing(0.64, 1.0, 2, 4, 0.5, rate_curvature=4.0)[0]) == (
      pytest.approx(float(weight) / 4.0, rel=1e-6))
  assert float(mixing.adaptive_mixing(0.64, 1.0, 2, 4, 0.5, rate_curvature=0.1)[0]) == 1.0


def test_pooling_against_a_direct_sum():
  """mixing.accumulate / pooled: the weighted mean with forgetting and its SE, against the
  weighted sum written out; a round given 1/10,000 the weight barely moves the pooled estimate."""
  x, se, decay = np.array([1.0, 2.0, 50.0]), np.array([0.5, 0.4, 40.0]), 0.8
  weight = 1.0 / np.array([0.5, 0.4, 50.0]) ** 2
  running = mixing.Pooled.empty()
  for xi, si, wi in zip(x, se, weight):
    running = mixing.accumulate(running, jnp.float32(xi), jnp.float32(si), jnp.float32(wi), decay)
  w = decay ** np.arange(len(x))[::-1] * weight
  mean, err = mixing.pooled(running)
  assert float(mean) == pytest.approx(np.sum(w * x) / np.sum(w), rel=1e-5)
  assert float(err) == pytest.approx(np.sqrt(np.sum(w ** 2 * se ** 2)) / np.sum(w), rel=1e-5)
  assert abs(float(mean) - 1.6) < 0.1
  empty_mean, empty_se = mixing.pooled(mixing.Pooled.empty())
  assert float(empty_mean) == 0.0 and np.isinf(float(empty_se))


def test_pooled_estimates_are_unbiased_over_many_rounds():
  """400 rounds of 64 probes at a known h = V^T grad (H = |h|^2 = 0.25) and |grad|^2 = G = 2.5,
  the noise BBC News LoRA sees (H ~ G / 10): each round's regression is pooled the way the edge
  pools it (mixing.pooling_weights). The pooled H and G are within 4 of their pooled standard
  errors of the truth; weighting each round by its own 1 / se^2 instead (the standard error grows
  with the estimate, so low rounds count more) lands below a third of H, over 10 SE off."""
  d, m, n, rounds, h_sq, g_sq = 64, 1, 64, 400, 0.25, 2.5
  basis = np.zeros((d, m), np.float32)
  basis[0, 0] = 1.0
  guide = guidance(basis, ALPHA)
  a, b = (float(x) for x in guided.scales(guide))
  rng = np.random.default_rng(0)
  u = rng.standard_normal((rounds, n, m)).astype(np.float32)
  g = b * u @ np.full(m, np.sqrt(h_sq / m), np.float32) + a * np.sqrt(g_sq) * (
      rng.standard_normal((rounds, n)).astype(np.float32))
  ests = jax.vmap(lambda gg, uu: mixing.regression(gg, uu, guide))(g, u)
  empty = mixing.Pooled.empty()
  proj, grad, by_own_se = empty, empty, empty
  for k in range(rounds):
    e = jax.tree.map(lambda x: x[k], ests)
    w_proj, w_grad = mixing.pooling_weights(e, mixing.pooled(proj)[0])
    proj = mixing.accumulate(proj, e.proj_sq, e.proj_sq_se, w_proj, 1.0)
    grad = mixing.accumulate(grad, e.grad_sq, e.grad_sq_se, w_grad, 1.0)
    by_own_se = mixing.accumulate(by_own_se, e.proj_sq, e.proj_sq_se, e.proj_sq_se ** -2, 1.0)
  (h_hat, h_se), (g_hat, g_se) = mixing.pooled(proj), mixing.pooled(grad)
  biased, biased_se = mixing.pooled(by_own_se)
  print(f'pooled H {float(h_hat):.4f} +- {float(h_se):.4f}, G {float(g_hat):.3f} +- '
        f'{float(g_se):.3f}; by own 1/se^2: H {float(biased):.4f} +- {float(biased_se):.4f}')
  assert abs(float(h_hat) - h_sq) < 4 * float(h_se) and float(h_se) < 0.1 * h_sq
  assert abs(float(g_hat) - g_sq) < 4 * float(g_se) and float(g_se) < 0.02 * g_sq
  assert float(biased) < h_sq / 3 and h_sq - float(biased) > 10 * float(biased_se)


def _train(pb, steps, guide_fn, lr, probes=1):
  step = zoo.make_zo_step(pb.loss, zoo.Estimator(eps=EPS, probes=probes))
  noise = jnp.asarray(np.random.default_rng(5).standard_normal(pb.d), jnp.float32)

  def body(s, w, data, noise):
    keys = _keys(probes, step=s)
    guide = guide_fn(pb.grad(w, data), noise)
    t, _, _ = step({'q': {'w': w}}, {}, data, keys, lr, guide)
    return t['q']['w']

  run = jax.jit(lambda w, data, noise: jax.lax.fori_loop(
      0, steps, lambda s, w: body(s, w, data, noise), w))
  return pb.gap(run(pb.w0, pb.data, noise))


@pytest.mark.parametrize('name', ['quadratic', 'logistic'])
@pytest.mark.parametrize('d', [10 ** 3, 10 ** 5, 10 ** 7])
def test_default_guided_hyperparameters_converge_at_every_dimension(name, d):
  """16 steps of one probe each. Plain ZO at its stable rate 1 / ((d + 2) L) barely moves at any d;
  guided ZO, whose plain part uses that same rate and whose step along V uses the default
  first-order rate, closes most of the gap at every d with the same hyperparameters. The cloud
  sends the gradient plus noise of 0.75 its norm (cosine ~0.8), fresh each step."""
  steps = 16
  pb = PROBLEMS[name](d)
  lr = 1.0 / ((d + 2) * pb.curvature)
  step_v = guided.step_ratio(guided.DEFAULT_LR_V, lr)

  def cloud(grad, noise):
    c = grad + 0.75 * jnp.linalg.norm(grad) / jnp.linalg.norm(noise) * noise
    return guided.make_guidance({'q': {'w': (c / jnp.linalg.norm(c))[None]}}, jnp.ones(1), ALPHA,
                                step_v=step_v)

  plain = _train(pb, steps, lambda g, n: None, lr)
  guided_gap = _train(pb, steps, cloud, lr)
  print(f'{name} d={d}: gap after {steps} steps: plain {plain:.4f}, guided {guided_gap:.4f} '
        f'({plain / guided_gap:.1f}x smaller)')
  assert plain > 0.9, plain
  assert guided_gap < 0.3, guided_gap


def test_bfloat16_weights_accumulate_sub_ulp_updates_through_the_master():
  """A bfloat16 leaf of ones (ulp 2^-7 above 1, 2^-8 below) gets 256 updates of 3e-4 z each (below
  half an ulp unless |z| > 6.5): stored in bfloat16 every one rounds away; through zoo.master (and
  the client's local steps, which keep it) they add up, bit for bit as in float32."""
  tree = {'q': {'w': jnp.ones(16, jnp.bfloat16)}}
  keys = _keys(256)
  coefs = jnp.full(256, 3e-4, jnp.float32)
  lost = zoo.apply_directions(tree, keys, coefs)
  kept = zoo.apply_directions(zoo.master(tree), keys, coefs)
  want = zoo.apply_directions({'q': {'w': jnp.ones(16, jnp.float32)}}, keys, coefs)
  np.testing.assert_array_equal(np.asarray(lost['q']['w'], np.float32), np.ones(16))
  assert kept['q']['w'].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(kept['q']['w']), np.asarray(want['q']['w']))
  assert np.abs(np.asarray(kept['q']['w']) - 1).max() > 2 ** -8     # more than half an ulp moved
  # float32 leaves: master returns them as they are.
  f32 = {'q': {'w': jnp.ones(4, jnp.float32)}}
  assert zoo.master(f32)['q']['w'] is f32['q']['w']

  # A client's local steps from bfloat16 global weights run on the master: the same result, bit
  # for bit, as starting from the float32 copy, and the edge's replay (zoo.replay on the master)
  # reproduces it.
  def loss(params, batch, perturb):
    w = hook(perturb, 'q', params['q'])['w']
    return 0.5 * jnp.sum((w.astype(jnp.float32) - 3.0) ** 2)

  est = zoo.Estimator(eps=1e-2, probes=2)
  client = jax.jit(fzo.make_client_update(loss, est))
  batches = {'x': jnp.zeros((8, 1))}
  local, up, _ = client(tree, {}, batches, 0, 1, 2, 1e-4)
  ref, _, _ = client(zoo.master(tree), {}, batches, 0, 1, 2, 1e-4)
  assert local['q']['w'].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(local['q']['w']), np.asarray(ref['q']['w']))
  assert np.abs(np.asarray(local['q']['w']) - 1).max() > 2 ** -9
  coefs = zoo.coefficients(1e-4, up.scalars, up.weights).reshape(-1)
  edge = zoo.replay(zoo.master(tree), 0, up.addresses.reshape(-1, 4), coefs)
  np.testing.assert_array_equal(np.asarray(edge['q']['w']), np.asarray(local['q']['w']))

"""The federated algorithms behind make_algorithm: they learn, and each protocol's ledger means what
its docstring says (FedAvg of local results, shared directions, K candidate seeds, adaptive probes).

Compiling a round dominates the run time, so every algorithm is run once (module-level cache) on a
tiny encoder whose trainable subset is the classifier head, and the checks read that run's history.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cooperllm_jax import zoo
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated.algorithms import fwdllm
from cooperllm_jax.federated.algorithms import ALGORITHMS, make_algorithm
from cooperllm_jax.models import Encoder, EncoderConfig
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.models.spec import is_spec
from cooperllm_jax.tree_math import tree_dot

CFG = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_positions=16, num_labels=2, type_vocab_size=0, pooling='mean')
MODEL = Encoder(CFG)
STEPS, BATCH, ROUNDS = 4, 8, 8
CLIENT_IDS = np.array([4, 0, 7], np.int32)       # ids differ from positions on purpose
COUNTS = np.array([40, 24, 32], np.float32)      # unequal, so the FedAvg weighting matters
FWD_PROBES, FWD_MIN, FWD_CANDIDATES = 4, 2, 3


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: np.asarray({'zeros': 0.0, 'ones': 1.0}.get(s.init, 0.0)
                           + 0.02 * rng.standard_normal(s.shape), np.float32),
      MODEL.specs(), is_leaf=is_spec)


def _task(n=96, t=8, seed=0):
  """Label = whether token 5 appears (at a random position); learnable from mean-pooled features."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, CFG.vocab_size, (n, t)).astype(np.int32)
  labels = rng.integers(0, 2, n).astype(np.int32)
  pos = rng.integers(0, t, n)
  ids[labels == 1, pos[labels == 1]] = 5
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'labels': labels}


PARAMS_NP = _params()
DATA = _task()
PUBLIC = _task(n=48, seed=5)     # the cloud's public examples: the same task, other examples
PARTS = np.split(np.random.default_rng(1).permutation(len(DATA['labels'])),
                 np.cumsum(COUNTS.astype(int))[:-1])
_full_loss = jax.jit(make_loss(MODEL))


def full_loss(params):
  return float(_full_loss(params, DATA))


def round_batches(round_index):
  """{name: [C, S, B, ...]}: each client's S batches drawn from its own examples."""
  idx = np.stack([np.random.default_rng([round_index, int(c)]).choice(part, (STEPS, BATCH))
                  for c, part in zip(CLIENT_IDS, PARTS)])
  return {k: jnp.asarray(v[idx]) for k, v in DATA.items()}


def config(name, **over):
  zo = dict(eps=1e-3, probes=2, scheme='central', distribution='gaussian', clip=None,
            trainable='head', lora_rank=4, lora_alpha=8.0, lora_targets=('attn/q', 'attn/v'),
            perturb_impl='xla', base_weights='f32', base_group=32)
  if name == 'fwdllm':
    zo['probes'] = FWD_PROBES
  if name == 'fedavg_bp':
    zo['trainable'] = 'full'   # the first-order bound on every weight, as the demo config has it
  zo.update(over.pop('zo', {}))
  # line_search=0: the rates are the configured ones (the line search's test turns it on).
  zgr = dict(alpha=0.5, adaptive=False, ema=0.8, pool_size=2,
             refresh=1, beta=1.0, guidance_format='f32', guidance_block=256,
             guidance_budget_bytes=0, guidance_topk=None, line_search=0)
  zgr.update(over.pop('zgr', {}))
  cloud = dict(mode='gradient', learning_rate=1e-2, weight_decay=0.0, batches=2, batch_size=16,
               lag=0, devices=0)
  cloud.update(over.pop('cloud', {}))
  lr = {'fedavg_bp': 3e-3}.get(name, 0.1)  # cooperllm's step along V has its own rate (zgr lr_v)
  # clients_per_round: what a mesh of up to 8 'clients' devices must divide (test_mesh.py); the
  # rounds here pass their own client ids.
  fwdllm = dict(candidates=FWD_CANDIDATES, min_probes=FWD_MIN, var_threshold=0.5)
  fwdllm.update(over.pop('fwdllm', {}))
  c = dict(algorithm=name, learning_rate=lr, weight_decay=0.0, clients_per_round=8,
           client_chunk=1, client_backend='map', seed=0, zo=zo, zgr=zgr, cloud=cloud,
           fwdllm=fwdllm)
  c.update(over)
  return ml_collections.ConfigDict(c)


def snapshot(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)   # np.array: never a view


@functools.cache
def history(name, rounds=ROUNDS, chunk=1, backend='map', link_budget=None, **over):
  """Runs `rounds` rounds on fresh jnp copies of the params; returns the algorithm, the caller's
  params, snapshots of the state before/after each round, the round inputs and results.
  over: config overrides as hashable (key, ((field, value), ...)) pairs, e.g. zgr=(('alpha', 1.0),).
  link_budget: cooperllm's clients -> bytes for guidance_format='link' (the run's clock's role)."""
  over = {k: dict(v) if isinstance(v, tuple) else v for k, v in over.items()}
  alg = make_algorithm(config(name, client_chunk=chunk, client_backend=backend, **over), MODEL,
                       PUBLIC)
  if link_budget is not None:
    alg.guidance.link_budget = link_budget
  params = jax.tree.map(jnp.asarray, PARAMS_NP)
  state = alg.init(params)
  states, results, inputs = [snapshot(state)], [], []
  for r in range(1, rounds + 1):
    batches = round_batches(r)
    state, result = alg.run_round(state, batches, COUNTS, CLIENT_IDS, r)
    states.append(snapshot(state))
    results.append(result)
    inputs.append(batches)
  return dict(alg=alg, params=params, states=states, results=results, inputs=inputs,
              final=alg.model_params(state))


def zoo_size(h) -> int:
  """d: the trainable weights the estimator spans."""
  return sum(x.size for x in jax.tree.leaves(h['states'][0].trainable))


def weights():
  return COUNTS / COUNTS.sum()


def max_rel_diff(a, b):
  diffs = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()
           / max(np.abs(np.asarray(y)).max(), 1e-30)
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(diffs)


# ------------------------------------------------------------------------------------------------


CLIENT_ALGORITHMS = [a for a in ALGORITHMS if a not in ('cloud_only', 'warm_start')]


@pytest.mark.parametrize('name', CLIENT_ALGORITHMS)  # the cloud baselines: tests/test_baselines.py
def test_every_algorithm_runs_rounds_and_lowers_the_training_loss(name):
  h = history(name)
  before, after = full_loss(PARAMS_NP), full_loss(h['final'])
  # The task starts at chance (ln 2) and every protocol makes clear progress in 8 rounds of 4 steps.
  assert before == pytest.approx(math.log(2), abs=0.02)
  assert after < before - 0.08, (before, after)
  first, last = h['results'][0].losses.mean(), h['results'][-1].losses.mean()
  assert last < first, (first, last)
  for result in h['results']:
    assert result.losses.shape == (3, STEPS) and np.all(np.isfinite(result.losses))
    assert result.uplink_bytes.shape == (3,) and np.all(result.uplink_bytes > 0)
    assert result.forwards.shape == result.backwards.shape == (3,)
    if name == 'fedavg_bp':
      assert np.all(result.backwards == STEPS) and result.uplink is None
    else:
      assert np.all(result.backwards == 0)
      probes_run = (result.uplink.weights > 0).sum(axis=(1, 2))
      np.testing.assert_array_equal(result.forwards, 2 * probes_run)           # central: 2 each
  # The caller's params were neither donated (deleted) nor changed by the rounds.
  for x, ref in zip(jax.tree.leaves(h['params']), jax.tree.leaves(PARAMS_NP)):
    np.testing.assert_array_equal(np.asarray(x), ref)
  assert full_loss(h['params']) == pytest.approx(before, rel=1e-6)
  # The frozen body is untouched (head mode): model_params changes only the head.
  for group in ('embed', 'layers') if name != 'fedavg_bp' else ():
    for x, ref in zip(jax.tree.leaves(h['final'][group]), jax.tree.leaves(PARAMS_NP[group])):
      np.testing.assert_array_equal(np.asarray(x), ref)


def test_fedmezo_global_model_is_the_count_weighted_average_of_local_results():
  h = history('fedmezo', rounds=2, backend='loop')
  alg = h['alg']
  client = jax.jit(alg.client_update)
  for r in (1, 2):
    before, after = h['states'][r - 1], h['states'][r]
    t0, frozen = before.trainable, before.frozen
    uplink = h['results'][r - 1].uplink
    local = []
    for i, c in enumerate(CLIENT_IDS):
      b = jax.tree.map(lambda x: x[i], h['inputs'][r - 1])
      t, up, _ = client(t0, frozen, b, alg.seed, jnp.int32(r), jnp.int32(c), alg.lr)
      np.testing.assert_array_equal(up.addresses, uplink.addresses[i])
      np.testing.assert_array_equal(up.addresses[..., :2], np.broadcast_to([r, c], (STEPS, 2, 2)))
      np.testing.assert_allclose(up.scalars, uplink.scalars[i], rtol=1e-5, atol=1e-6)
      local.append(snapshot(t))
    avg = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights(), xs)), *local)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 after.trainable, avg)
    # Power: the unweighted mean, or any single client, is off by far more than the tolerance.
    plain = jax.tree.map(lambda *xs: sum(xs) / 3, *local)
    assert max_rel_diff(plain, avg) > 1e-3
    assert min(max_rel_diff(t, avg) for t in local) > 1e-3


@pytest.mark.parametrize('distribution', ['gaussian', 'gaussian_hash'])
def test_decomfl_shares_directions_and_its_edge_equals_replaying_every_client(distribution):
  h = (history('decomfl') if distribution == 'gaussian'      # the run the other tests share
       else history('decomfl', rounds=2, zo=(('distribution', distribution),)))
  alg = h['alg']
  for r, result in enumerate(h['results'], 1):
    a = result.uplink.addresses
    for i in range(1, 3):
      np.testing.assert_array_equal(a[i], a[0])                       # identical across clients
    want = [[[r, -1, s, p] for p in range(2)] for s in range(STEPS)]
    np.testing.assert_array_equal(a[0], want)
    assert result.broadcast_bytes == STEPS * 2 * 4           # one scalar per (step, probe)
    assert not np.allclose(result.uplink.scalars[0], result.uplink.scalars[1])   # own data
  # Replaying every client's ledger (FedMeZO-style, count-weighted) gives the edge's model.
  replay = jax.jit(zoo.replay, static_argnames='distribution')
  for r in (1, 2):
    up = h['results'][r - 1].uplink
    coefs = zoo.coefficients(alg.lr, up.scalars, up.weights) * weights()[:, None, None]
    every = replay(h['states'][r - 1].trainable, alg.seed,
                   jnp.asarray(up.addresses).reshape(-1, 4), coefs.reshape(-1),
                   distribution=distribution)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                 h['states'][r].trainable, every)
    moved = max_rel_diff(h['states'][r].trainable, h['states'][r - 1].trainable)
    assert moved > 1e-3


def test_fedkseed_draws_from_the_candidate_pool_and_fits_its_byte_budget():
  h = history('fedkseed')
  alg = h['alg']
  k = alg.kseed_candidates
  assert k == 4096
  all_addr = np.concatenate([r.uplink.addresses.reshape(-1, 4) for r in h['results']])
  assert np.all(all_addr[:, :3] == -1)
  assert np.all((all_addr[:, 3] >= 0) & (all_addr[:, 3] < k))
  assert len(np.unique(all_addr[:, 3])) > len(all_addr) // 2             # spread over the pool
  for result in h['results']:
    probes = (result.uplink.weights > 0).sum(axis=(1, 2))
    np.testing.assert_array_equal(probes, STEPS * 2)
    # scalar (4 B) + candidate index (ceil(12 bits / 8) = 2 B) per probe, + the example count.
    np.testing.assert_array_equal(result.uplink_bytes, probes * 6 + 4)
    assert np.all(result.uplink_bytes < 18_000)
    assert result.broadcast_bytes == 4 * k
  # The model is init + sum_k a_k z_k: replaying one accumulated coefficient per candidate seed
  # reproduces the final model after all rounds.
  acc = np.zeros(k, np.float64)
  for result in h['results']:
    up = result.uplink
    coefs = np.asarray(zoo.coefficients(alg.lr, up.scalars, up.weights)) * weights()[:, None, None]
    np.add.at(acc, up.addresses[..., 3].ravel(), coefs.ravel())
  used = np.nonzero(acc)[0]
  ledger = np.stack([np.full_like(used, -1)] * 3 + [used], -1).astype(np.int32)
  synced = jax.jit(zoo.replay)(h['states'][0].trainable, alg.seed, jnp.asarray(ledger),
                               jnp.asarray(acc[used], jnp.float32))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               synced, h['states'][-1].trainable)


def _stops_here(g, thr):
  """FwdLLM's rule on the first n scalars: stderr of the mean <= thr * mean |g| (float32)."""
  g = np.asarray(g, np.float32)
  n = np.float32(len(g))
  mean_abs = np.abs(g).sum() / n
  var = (np.sum(g * g) - n * (g.sum() / n) ** 2) / max(n - 1, 1)
  return np.sqrt(max(var, 0) / n) <= thr * mean_abs


def test_fwdllm_adaptive_probes_and_cosine_choice():
  h = history('fwdllm')
  alg = h['alg']
  thr = alg.fwdllm_var_threshold
  used_counts = []
  for r, result in enumerate(h['results'], 1):
    up = result.uplink
    assert up.weights.shape == (3, STEPS, FWD_PROBES)
    n = (up.weights > 0).sum(-1)                                          # [C, S]
    assert np.all((n >= FWD_MIN) & (n <= FWD_PROBES))
    used_counts += n.ravel().tolist()
    for c in range(3):
      for s in range(STEPS):
        k = n[c, s]
        np.testing.assert_array_equal(up.weights[c, s, :k], np.float32(1.0 / k))   # used prefix
        np.testing.assert_array_equal(up.weights[c, s, k:], 0.0)                  # unused: 0
        g = up.scalars[c, s]
        assert k == FWD_PROBES or _stops_here(g[:k], thr)          # stopped by the rule or the cap
        assert all(not _stops_here(g[:j], thr) for j in range(FWD_MIN, k))   # not earlier
        slots = np.arange(k)
        probe = up.addresses[c, s, :k, 3]
        np.testing.assert_array_equal(up.addresses[c, s, :k, :3],
                                      np.broadcast_to([r, CLIENT_IDS[c], s], (k, 3)))
        assert np.all((probe >= slots * FWD_CANDIDATES) & (probe < (slots + 1) * FWD_CANDIDATES))
        if r == 1:   # no previous update yet: candidate 0 of each slot
          np.testing.assert_array_equal(probe, slots * FWD_CANDIDATES)
    # probe count per step (1 B) + per used probe scalar (4 B) and candidate index (1 B) + count.
    np.testing.assert_array_equal(result.uplink_bytes, n.sum(-1) * 5 + STEPS + 4)
  assert len(set(used_counts)) > 1, used_counts                          # it does adapt
  # Round 2's choices maximize |cos(z, previous global update)| among each slot's candidates.
  prev = jax.tree.map(lambda a, b: a - b, h['states'][1].trainable, h['states'][0].trainable)
  jax.tree.map(np.testing.assert_array_equal, h['states'][1].extra.prev_update, prev)
  up = h['results'][1].uplink
  for c, s in ((0, 0), (2, STEPS - 1)):
    slot = 0
    cand = [(2, CLIENT_IDS[c], s, slot * FWD_CANDIDATES + j) for j in range(FWD_CANDIDATES)]
    cos = [abs(float(fwdllm.cosine_to(prev, zoo.address_key(alg.seed, a), 'gaussian')))
           for a in cand]
    assert up.addresses[c, s, slot, 3] == int(np.argmax(cos)), cos
  assert np.any(up.addresses[:, :, 0, 3] != 0)          # the choice is active (not always the 1st)
  # Replaying the uplink (unused slots included, with weight 0) gives the edge's model.
  r = 2
  coefs = zoo.coefficients(alg.lr, up.scalars, up.weights) * weights()[:, None, None]
  every = jax.jit(zoo.replay)(h['states'][r - 1].trainable, alg.seed,
                              jnp.asarray(up.addresses).reshape(-1, 4), coefs.reshape(-1))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               h['states'][r].trainable, every)


@pytest.mark.parametrize('chunk,backend', [(2, 'map'), (1, 'loop')])
def test_client_backends_agree(chunk, backend):
  """map with chunk 1 (lax.map), chunk 2 (vmap over 2 clients + a remainder of 1) and the Python
  loop give the same rounds, up to float32 rounding.

  Batched (vmapped) forwards sum in another order, so a loss can move by an ulp or two, and the
  finite difference g = (L+ - L-) / (2 eps) turns that into ~ulp(L) / eps (~6e-5 at eps = 1e-3;
  observed: scalars 6e-5 to 9e-5, trainable 7e-6 absolute = 5e-5 relative to its largest entry).
  The bounds: 4 ulp(L) / eps for g, and lr * S * (that) * 4 (|z| of a 66-dim draw) for the
  weights, which one round moves by ~0.1: a wrong client, weight or address is off by far more.
  """
  ref = history('fedmezo')
  other = history('fedmezo', rounds=2, chunk=chunk, backend=backend)
  alg = ref['alg']
  for r in (1, 2):
    a, b = ref['results'][r - 1], other['results'][r - 1]
    np.testing.assert_array_equal(a.uplink.addresses, b.uplink.addresses)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-5)
    g_tol = 4 * np.spacing(np.float32(np.abs(a.losses).max())) / alg.est.eps
    np.testing.assert_allclose(b.uplink.scalars, a.uplink.scalars, rtol=0, atol=g_tol)
    w_tol = alg.lr * STEPS * g_tol * 4
    new, old = other['states'][r].trainable, ref['states'][r].trainable
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=w_tol), new, old)
    moved = max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(
        ref['states'][r - 1].trainable)))
    assert moved > 100 * w_tol


def test_make_algorithm_rejects_bad_configs():
  with pytest.raises(ConfigError, match='fedsgd'):
    make_algorithm(config('fedsgd'), MODEL)
  with pytest.raises(ConfigError, match='scheme'):
    make_algorithm(config('fedmezo', zo={'scheme': 'forward'}), MODEL)
  with pytest.raises(ConfigError, match='trainable mode'):
    make_algorithm(config('fedmezo', zo={'trainable': 'everything'}), MODEL)
  with pytest.raises(ConfigError, match=r'fwdllm\.min_probes=5 must be at most zo\.probes=4'):
    make_algorithm(config('fwdllm', fwdllm={'min_probes': FWD_PROBES + 1}), MODEL)
  with pytest.raises(ConfigError, match='client_chunk'):
    make_algorithm(config('fedmezo', client_chunk=0), MODEL)
  assert set(ALGORITHMS) == {'cooperllm', 'fedmezo', 'fedkseed', 'decomfl', 'fwdllm', 'fedavg_bp',
                             'cloud_only', 'warm_start'}


def test_unknown_client_backend_is_a_config_error():
  with pytest.raises(ConfigError, match='backend'):
    make_algorithm(config('fedmezo', client_backend='mapp'), MODEL)


# ------------------------------------------------------------------------------------------------
# cooperllm (ZGR)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('zgr,cloud,match', [
    ({'alpha': 1.5}, {}, 'alpha'), ({'alpha': -0.1}, {}, 'alpha'), ({'pool_size': 0}, {}, 'pool'),
    ({'refresh': 0}, {}, 'refresh'), ({'beta': 0.0}, {}, 'beta'),
    ({'alpha_min': 0.1}, {}, 'alpha_min was removed'), ({'curvature_cap': -1.0}, {}, 'curvature_cap'),
    ({'trace_cap': -1.0}, {}, 'trace_cap'), ({'trace_probes': 0}, {}, 'trace_probes'),
    ({'line_search': -1}, {}, 'line_search'),
    ({}, {'lag': 2}, 'lag'), ({}, {'batches': 0}, 'batches'), ({}, {'mode': 'adam'}, 'mode'),
    ({}, {'devices': 1}, 'devices'), ({'guidance_format': 'int2'}, {}, 'guidance_format'),
    ({'guidance_format': 'adaptive'}, {}, 'guidance_budget_bytes'),
    ({'guidance_block': 0}, {}, 'block'), ({'guidance_topk': 1.5}, {}, 'topk')])
def test_cooperllm_rejects_bad_configs(zgr, cloud, match):
  with pytest.raises(ConfigError, match=match):
    make_algorithm(config('cooperllm', zgr=zgr, cloud=cloud), MODEL, PUBLIC)


def test_cooperllm_needs_public_data():
  with pytest.raises(ConfigError, match='public'):
    make_algorithm(config('cooperllm'), MODEL, None)


def test_cooperllm_with_alpha_one_is_fedmezo():
  """alpha = 1 draws exactly FedMeZO's directions (bitwise: tests/test_guided.py); the rounds are
  different compiled programs, whose forwards may round an ulp apart (amplified by 1/(2 eps))."""
  guided_run = history('cooperllm', rounds=2, zgr=(('alpha', 1.0),), learning_rate=0.1)
  mixed = history('cooperllm', rounds=2, learning_rate=0.1)
  plain = history('fedmezo', rounds=2)
  for a, b, c in zip(guided_run['states'][1:], plain['states'][1:], mixed['states'][1:]):
    assert max_rel_diff(a.trainable, b.trainable) < 1e-4
    assert max_rel_diff(c.trainable, b.trainable) > 1e-2      # alpha = 0.5 is not plain
  assert guided_run['results'][0].metrics['basis_rank'] == 1       # one direction after round 1


def _replays_the_edge(h, r):
  """The edge's model after round r is the replay of every client's uplink under the round's V
  (the round's in-jit replay may fuse differently from this standalone one: an ulp or so)."""
  alg, before, after = h['alg'], h['states'][r - 1], h['states'][r]
  up = h['results'][r - 1].uplink
  coefs = zoo.coefficients(alg.zo.lr, up.scalars, up.weights) * weights()[:, None, None]
  replayed = jax.jit(zoo.replay, static_argnames='distribution')(
      before.trainable, alg.zo.seed, jnp.asarray(up.addresses).reshape(-1, 4), coefs.reshape(-1),
      guide=after.extra.guidance)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8),
               after.trainable, replayed)


def test_cooperllm_pool_is_the_cloud_gradient_and_the_edge_replays_under_it():
  h = history('cooperllm', rounds=3)
  alg = h['alg']
  from cooperllm_jax.cloud import pool as pool_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.federated import client_data  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.zoo.trainable import overlay  # pylint: disable=g-import-not-at-top
  loss = make_loss(MODEL)
  for r in (1, 2, 3):
    before, after = h['states'][r - 1], h['states'][r]
    # The newest pool entry is the mean public gradient at the round's starting model.
    pub = client_data.public_batches(PUBLIC, 2, 16, alg.zo.seed, r)
    grads = [jax.grad(lambda t: loss(overlay(before.frozen, t), jax.tree.map(lambda x: x[k], pub)))(
        before.trainable) for k in range(2)]
    want = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    got = jax.tree.map(lambda x: x[0], after.extra.pool.directions)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), got, want)
    assert int(after.extra.pool.filled) == min(r, 2)
    basis, valid = pool_lib.orthonormalize(after.extra.pool)
    np.testing.assert_array_equal(after.extra.guidance.valid, valid)
    _replays_the_edge(h, r)
    assert h["results"][r - 1].guidance_bytes == 2 * zoo_size(h) * 4 + 4


def test_cooperllm_halving_the_rate_halves_the_step_along_v_too():
  """The divergence guard halves state.lr; the step along V (rate lr_V) must shrink with it,
  or a rollback would leave the cloud-directed part of a diverging step at full size. One local
  step, so that every probe sees the same model and the update is linear in the rate."""
  h = history('cooperllm', rounds=1)
  alg, start = h['alg'], h['states'][1]
  batches = {k: v[:, :1] for k, v in round_batches(2).items()}
  deltas = []
  for scale in (1.0, 0.5):
    state = jax.tree.map(jnp.asarray, start)
    state = state._replace(lr=start.lr * scale)
    after, _ = alg.run_round(state, batches, COUNTS, CLIENT_IDS, 2)
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, after.trainable,
                               start.trainable))
  full, half = (np.concatenate([x.ravel() for x in jax.tree.leaves(d)]) for d in deltas)
  np.testing.assert_allclose(half, 0.5 * full, rtol=1e-4, atol=1e-7 * np.abs(full).max())
  basis = np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                          for x in jax.tree.leaves(after.extra.guidance.basis)], axis=1)
  along_v = np.linalg.norm(basis @ full) / np.linalg.norm(full)
  assert along_v > 0.05, along_v      # the step has a V part for the halving to act on


def test_cooperllm_runs_are_deterministic():
  a = history('cooperllm', rounds=2)
  b = history('cooperllm', rounds=2, zgr=(('alpha', 0.5),))  # same config, a separate run
  assert a is not b
  for x, y in zip(jax.tree.leaves(a['states'][-1]), jax.tree.leaves(b['states'][-1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cooperllm_cloud_lag_uses_the_previous_rounds_direction():
  lagged = history('cooperllm', rounds=3, cloud=(('lag', 1),))
  now = history('cooperllm', rounds=3)
  # Round 1 has no guidance yet (plain ZO); round r's pool holds the direction computed at
  # round r-1's starting model, which is what the lag-0 run pushed in round r-1.
  assert lagged['results'][0].metrics['basis_rank'] == 0
  first = jax.tree.map(lambda x: x[0], lagged['states'][2].extra.pool.directions)
  lag_dir = jax.tree.map(lambda x: x[0], now['states'][1].extra.pool.directions)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), first, lag_dir)


def test_cooperllm_refresh_keeps_the_basis_between_refreshes():
  h = history('cooperllm', rounds=3, zgr=(('refresh', 2),))
  g = [s.extra.guidance for s in h['states'][1:]]
  for x, y in zip(jax.tree.leaves(g[0].basis), jax.tree.leaves(g[1].basis)):
    np.testing.assert_array_equal(x, y)                         # round 2 reuses round 1's V
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(g[1].basis),
                                                      jax.tree.leaves(g[2].basis)))


@pytest.mark.parametrize('cap', [0.0, 1.0])
def test_cooperllm_adaptive_weight_is_set_from_the_pooled_estimates(cap):
  """Each round's weight on the V step is adaptive_mixing of the rounds before, pooled with the
  logged weights and forgetting zgr.ema: recomputed here in numpy from the logged estimates (the
  weights' unbiasedness is test_zgr_dimensions'). alpha stays put.
  With the curvature measured (cap > 0) the weight is min(1, H / (lr_V L_V (H + noise))) at the
  round's capped rate lr_V."""
  from cooperllm_jax.zoo import guided  # pylint: disable=g-import-not-at-top
  h = history('cooperllm', rounds=4, zgr=(('adaptive', True), ('curvature_cap', cap)))
  alg, rs = h['alg'], h['results']
  z = alg.guidance.zgr
  assert rs[0].metrics['cloud_step_v'] == 0                     # no estimate yet: no V step
  weights, unmeasured = [], []
  for r in range(1, len(rs)):
    k = np.arange(r)[::-1]                                       # rounds ago, newest 0
    pooled = {}
    for key in ('proj_sq', 'grad_sq'):
      x = np.array([rs[i].metrics[key] for i in range(r)], np.float64)
      w = z.ema ** k * np.array([rs[i].metrics[key + '_weight'] for i in range(r)], np.float64)
      pooled[key] = np.sum(w * x) / np.sum(w)
    h2, m, probes = max(pooled['proj_sq'], 0.0), rs[r].metrics['basis_rank'], 2 * len(CLIENT_IDS)
    ratio = z.alpha / (1 - z.alpha)
    lr_v, kappa = z.lr_v, 1.0
    if cap:
      curvature = rs[r].metrics['cloud_curvature']
      lr_v = rs[r].metrics['lr_v']
      kappa = lr_v * curvature if curvature > 0 else 1.0
    noisy = h2 + (m * ratio * pooled['grad_sq'] + (m + 1) * h2) / probes
    weights.append(min(1.0, h2 / (kappa * noisy)))
    unmeasured.append(h2 / noisy)
    step_v = float(guided.step_ratio(lr_v, alg.zo.lr))
    assert rs[r].metrics['cloud_step_v'] == pytest.approx(weights[-1] * step_v, rel=1e-3,
                                                          abs=1e-6)
  assert all(r.metrics['alpha'] == pytest.approx(z.alpha) for r in rs)
  assert max(weights) > 0                                        # the cloud earns a step here
  if cap:   # the measured curvature changes the weights (here: lr_V L_V < 1, a larger step)
    assert all(w > u for w, u in zip(weights, unmeasured) if u > 0), (weights, unmeasured)
  for r in rs:
    assert r.metrics['grad_sq'] > 0 and r.metrics['grad_sq_se'] > 0
    assert r.metrics['grad_sq_weight'] > 0 and r.metrics['proj_sq_weight'] > 0
    assert 0.0 <= r.metrics['cloud_share'] <= 1.0
  _replays_the_edge(h, len(rs))


def test_cooperllm_curvature_cap_sets_the_v_rate_from_the_clouds_curvature():
  """With zgr.curvature_cap the round's V rate is min(lr_v, cap / L_V) for the curvature L_V the
  cloud measured along its direction (lr_v itself where L_V <= 0); the edge still replays."""
  from cooperllm_jax.zoo import guided  # pylint: disable=g-import-not-at-top
  cap = 1e-4   # binds wherever the curvature is above cap / lr_v = 1e-3
  h = history('cooperllm', rounds=3, zgr=(('curvature_cap', cap),))
  alg, rs = h['alg'], h['results']
  lr_v, lr = alg.guidance.zgr.lr_v, alg.zo.lr
  curvatures = [r.metrics['cloud_curvature'] for r in rs]
  assert any(c > cap / lr_v for c in curvatures), curvatures
  for r, c in zip(rs, curvatures):
    expected = min(lr_v, cap / c) if c > 0 else lr_v
    assert r.metrics['lr_v'] == pytest.approx(expected, rel=1e-6)
    assert r.metrics['cloud_step_v'] == pytest.approx(float(guided.step_ratio(expected, lr)),
                                                      rel=1e-5)
  assert 'cloud_curvature' not in history('cooperllm', rounds=1)['results'][0].metrics
  _replays_the_edge(h, len(rs))


def test_cooperllm_line_search_sets_both_rates_from_the_clouds_accepted_step():
  """With zgr.line_search the round's V rate is min(lr_v, t / S) for the step t the cloud's line
  search accepted over the round's S local steps, and the plain step runs at min(1, t / t_1) of
  lr (t_1: the first round's step, where lr was tuned); the edge still replays."""
  from cooperllm_jax.zoo import guided  # pylint: disable=g-import-not-at-top
  h = history('cooperllm', rounds=3, zgr=(('line_search', 12), ('lr_v', 100.0)),
              local_steps=STEPS)
  alg, rs = h['alg'], h['results']
  lr_v, lr, steps = alg.guidance.zgr.lr_v, alg.zo.lr, alg.guidance.local_steps
  assert steps == STEPS > 1
  line = [r.metrics['cloud_line_step'] for r in rs]
  assert all(0 < t < lr_v * steps for t in line), line   # the search backtracked every round
  for r, t in zip(rs, line):
    assert r.metrics['lr_v'] == pytest.approx(min(lr_v, t / steps), rel=1e-6)
    assert r.metrics['cloud_step_v'] == pytest.approx(
        float(guided.step_ratio(min(lr_v, t / steps), lr)), rel=1e-5)
    assert r.metrics['plain_share'] == pytest.approx(min(1.0, t / line[0]), rel=1e-6)
  assert rs[0].metrics['plain_share'] == 1.0
  _replays_the_edge(h, len(rs))


def test_cooperllm_trace_cap_sets_the_plain_rate_from_the_clouds_hessian_trace():
  """With zgr.trace_cap the round's plain step runs at min(1, cap / (lr tr H)) of lr for the trace
  the cloud estimated (Hutchinson), so it moves the weights less; the edge still replays."""
  cap = 1e-6   # binds wherever tr H > cap / lr
  h = history('cooperllm', rounds=3, zgr=(('trace_cap', cap), ('lr_v', 0.0)))
  alg, rs = h['alg'], h['results']
  lr = alg.zo.lr
  traces = [r.metrics['cloud_trace'] for r in rs]
  assert all(t > cap / lr for t in traces), traces
  for r, t in zip(rs, traces):
    assert r.metrics['plain_share'] == pytest.approx(min(1.0, cap / (lr * t)), rel=1e-6)
  assert 'cloud_trace' not in history('cooperllm', rounds=1)['results'][0].metrics
  _replays_the_edge(h, len(rs))
  # Without a V step (lr_v = 0) there is nothing to line-search: the search stays off.
  free = history('cooperllm', rounds=1, zgr=(('lr_v', 0.0), ('line_search', 12)))
  assert 'cloud_line_step' not in free['results'][0].metrics
  moved = lambda hh: float(tree_dot(*[jax.tree.map(jnp.subtract, hh['states'][1].trainable,
                                                   hh['states'][0].trainable)] * 2))
  assert 0 < moved(h) < 0.5 * moved(free), (moved(h), moved(free))


def test_cooperllm_quantized_guidance_bytes_and_replay():
  """The clients and the edge's replay both use the decoded V; each client is charged the codec's
  exact wire bytes of V (m = 2 slots over the head) plus alpha."""
  from cooperllm_jax.cloud import pool as pool_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.system import codec as C  # pylint: disable=g-import-not-at-top
  h = history('cooperllm', rounds=2, zgr=(('guidance_format', 'int8'),))
  alg = h['alg']
  for r in (1, 2):
    after, result = h['states'][r], h['results'][r - 1]
    sent = after.extra.guidance.basis
    assert result.guidance_bytes == C.tree_nbytes(sent, C.LeafCodec('int8')) + 4
    assert result.guidance_bytes < 2 * zoo_size(h) * 4 / 3
    # V as sent is the orthonormal basis up to the codec's (reported) rounding error.
    basis, _ = pool_lib.orthonormalize(after.extra.pool)
    diff = jax.tree.map(lambda x, y: x - y, sent, basis)
    rel = float(pool_lib.tree_dot(diff, diff) / pool_lib.tree_dot(basis, basis))
    assert 0 < rel < 1e-3
    assert result.metrics['guidance_rel_error'] == pytest.approx(rel, rel=1e-4)
    _replays_the_edge(h, r)
  # A client run on its own with the decoded V sends the scalars the round's client 0 sent.
  before, r = h['states'][0], 1
  b0 = jax.tree.map(lambda x: x[0], h['inputs'][0])
  _, up, _ = alg.zo.round.client(before.trainable, before.frozen, b0, alg.zo.seed, r,  # pylint: disable=protected-access
                             CLIENT_IDS[0], alg.zo.lr, guide=h['states'][1].extra.guidance)
  np.testing.assert_allclose(up.scalars, h['results'][0].uplink.scalars[0], rtol=1e-3, atol=1e-3)


def test_cooperllm_adaptive_guidance_allocates_formats_within_the_budget():
  from cooperllm_jax.system import codec as C  # pylint: disable=g-import-not-at-top
  budget = 200  # V in float32 would be 2 * (32 * 2 + 2) * 4 = 528 bytes
  h = history('cooperllm', rounds=2, zgr=(('guidance_format', 'adaptive'),
                                          ('guidance_budget_bytes', budget)))
  for r in (1, 2):
    result = h['results'][r - 1]
    formats = result.metrics['guidance_formats']
    assert set(formats) == {'head/classifier/kernel', 'head/classifier/bias'}
    codecs = {k: C.LeafCodec(f) for k, f in formats.items()}
    sent = C.tree_nbytes(h['states'][r].extra.guidance.basis, codecs)
    assert sent <= budget and result.guidance_bytes == sent + 4 + len(formats)  # + format bytes
    assert formats['head/classifier/kernel'] != 'f32'
    _replays_the_edge(h, r)


def test_cooperllm_link_guidance_takes_each_rounds_budget_from_the_sampled_clients():
  from cooperllm_jax.system import codec as C  # pylint: disable=g-import-not-at-top
  asked = []

  def budget(clients):
    asked.append([int(c) for c in clients])
    return 200   # V in float32 would be 528 bytes
  h = history('cooperllm', rounds=2, link_budget=budget, zgr=(('guidance_format', 'link'),))
  assert asked == [list(CLIENT_IDS)] * 2
  for r in (1, 2):
    result = h['results'][r - 1]
    codecs = {k: C.LeafCodec(f) for k, f in result.metrics['guidance_formats'].items()}
    sent = C.tree_nbytes(h['states'][r].extra.guidance.basis, codecs)
    assert sent <= 200 and result.guidance_bytes == sent + 4 + len(codecs)
    _replays_the_edge(h, r)
  # A link that cannot carry even the coarsest codes gets those (the round waits), not an error.
  h = history('cooperllm', rounds=1, link_budget=lambda clients: 1,
              zgr=(('guidance_format', 'link'),))
  assert set(h['results'][0].metrics['guidance_formats'].values()) == {'ternary'}
  with pytest.raises(ConfigError, match="guidance_format='link' takes its byte budget"):
    history('cooperllm', rounds=1, zgr=(('guidance_format', 'link'),))


def test_cooperllm_with_alpha_one_ignores_quantized_guidance():
  quantized = history('cooperllm', rounds=2, learning_rate=0.1,
                      zgr=(('alpha', 1.0), ('guidance_format', 'int4')))
  plain = history('fedmezo', rounds=2)
  for a, b in zip(quantized['states'][1:], plain['states'][1:]):
    assert max_rel_diff(a.trainable, b.trainable) < 1e-4


def test_quantized_base_weights_round():
  """zo.base_weights keeps the frozen body int8 on the clients; the model the edge evaluates is
  the dequantized body with the trained head."""
  from cooperllm_jax.zoo.quantized import Quantized  # pylint: disable=g-import-not-at-top
  h = history('fedmezo', rounds=2, zo=(('base_weights', 'int8'),))
  state = h['states'][-1]
  assert isinstance(state.frozen['layers']['attn']['q']['kernel'], Quantized)
  final = h['final']
  np.testing.assert_allclose(final['layers']['attn']['q']['kernel'],
                             PARAMS_NP['layers']['attn']['q']['kernel'], atol=0.1 / 254)  # half a step
  assert full_loss(final) < full_loss(h['alg'].model_params(h['states'][0]))
  with pytest.raises(ConfigError, match='base_weights'):
    make_algorithm(config('fedmezo', zo={'base_weights': 'int3'}), MODEL)

"""Faults, robust aggregation, the divergence guard, DP accounting and crash-safe checkpoints, on
synthetic inputs and the tiny encoder of test_zo_algorithms (fast: no real model)."""

import asyncio
import gc
import logging
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import test_zo_algorithms as tz
from cooperllm_jax import checkpoint as checkpoint_lib
from cooperllm_jax.errors import CheckpointError, ConfigError, TrainingError
from cooperllm_jax import config as config_lib
from cooperllm_jax.federated import channel, edge
from cooperllm_jax.federated import faults as faults_lib
from cooperllm_jax.federated.clients import Uplink
from cooperllm_jax.run import guard as guard_lib
from cooperllm_jax.federated.algorithms import make_algorithm
from cooperllm_jax.federated.api import ServerState
from cooperllm_jax.federated.privacy import GaussianPrivacy
from cooperllm_jax.reporting import truncate_metrics


# -- the edge's robust statistics -----------------------------------------------------------------

def test_trimmed_mean_and_median_match_numpy_with_masks():
  rng = np.random.default_rng(0)
  values = rng.standard_normal((7, 5, 3)).astype(np.float32)
  valid = np.ones(7, bool)
  valid[[1, 4]] = False
  kept = values[valid]                                                   # n = 5
  median = edge.trimmed_mean(jnp.asarray(values), jnp.asarray(valid), 0.5)
  np.testing.assert_allclose(median, np.median(kept, axis=0), rtol=1e-6)
  trimmed = edge.trimmed_mean(jnp.asarray(values), jnp.asarray(valid), 0.2)  # cuts 1 at each end
  np.testing.assert_allclose(trimmed, np.sort(kept, axis=0)[1:4].mean(0), rtol=1e-5)
  np.testing.assert_allclose(edge.trimmed_mean(jnp.asarray(values), jnp.asarray(valid), 0.0),
                             kept.mean(0), rtol=1e-5)
  even = edge.trimmed_mean(jnp.asarray(values[:4]), jnp.ones(4, bool), 0.5)   # mean of middle two
  np.testing.assert_allclose(even, np.median(values[:4], axis=0), rtol=1e-6)
  # A per-entry mask ([C, S, P]) and coordinates where nothing is valid (-> 0).
  entry = np.ones(values.shape, bool)
  entry[:, 0, 0] = False
  entry[:3, 1, 1] = False
  out = np.asarray(edge.trimmed_mean(jnp.asarray(values), jnp.asarray(entry), 0.5))
  assert out[0, 0] == 0
  np.testing.assert_allclose(out[1, 1], np.median(values[3:, 1, 1]), rtol=1e-6)


def test_clip_scales_only_clients_above_the_median_norm():
  scalars = np.ones((4, 2, 1), np.float32) * np.array([1, 2, 3, 50], np.float32)[:, None, None]
  up = Uplink(np.zeros((4, 2, 1, 4), np.int32), scalars, np.ones_like(scalars))
  arrived = np.array([True, True, True, False])          # the absent giant sets no bound
  out = np.asarray(edge.clip_clients(up, jnp.asarray(arrived), 1.0).scalars)
  np.testing.assert_allclose(out[:, 0, 0], [1, 2, 2, 2], rtol=1e-6)   # bound = median norm (2)


def _attacked_round(name, rules):
  """Round 1 of test_zo_algorithms' cached run, with client 0's scalars x -10: the distance of each
  rule's update from the clean FedAvg update, and the clean update's size."""
  h = tz.history(name)
  result, start, clean = h['results'][0], h['states'][0], h['states'][1].trainable
  attacked = result.uplink._replace(
      scalars=result.uplink.scalars * np.float32([-10, 1, 1])[:, None, None])
  dist = {}
  for rule in rules:
    c = tz.config(name)
    c.aggregation = rule
    alg = make_algorithm(c, tz.MODEL, tz.PUBLIC)
    new = alg.edge_update(jax.tree.map(jnp.asarray, start), attacked, result.client_weights,
                          None).trainable
    dist[rule] = math.sqrt(sum(float(np.sum((np.asarray(a) - b) ** 2)) for a, b in
                               zip(jax.tree.leaves(new), jax.tree.leaves(clean))))
  step = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in
                       zip(jax.tree.leaves(clean), jax.tree.leaves(start.trainable))))
  return dist, step


@pytest.mark.parametrize('name', ['fedmezo', 'decomfl'])
def test_robust_rules_resist_a_scaled_sign_flipped_client(name):
  dist, step = _attacked_round(name, ['mean', 'median', 'clip'])  # median = max-cut trimmed_mean
  assert dist['mean'] > 3 * step, (dist, step)           # the attack dominates plain averaging
  for rule in ('median', 'clip'):
    assert dist[rule] < dist['mean'] / 3, (rule, dist, step)


# -- the channel -----------------------------------------------------------------------------------

def test_faults_are_deterministic_per_client_and_have_their_rates():
  f = faults_lib.FaultModel(config_lib.Faults(dropout=0.3, deadline=2.0, latency_sigma=0.5,
                                               byzantine=0.2), num_clients=1000, seed=3)
  assert len(f.byzantine_ids) == 200 and len(set(f.byzantine_ids)) == 200
  clients = np.arange(1000)
  dropped, late = f.arrivals(clients, 7)
  assert abs(dropped.mean() - 0.3) < 0.05
  # latency = exp(N(0, 2 * 0.5^2)): P(> 2) = P(N(0,1) > ln 2 / 0.707) = 0.163, among the rest.
  assert abs(late.sum() / (~dropped).sum() - 0.163) < 0.04 and not (late & dropped).any()
  # A client's fate depends on (seed, round, client) only, not on who else was sampled.
  d2, l2 = f.arrivals(clients[::7], 7)
  np.testing.assert_array_equal(d2, dropped[::7])
  np.testing.assert_array_equal(l2, late[::7])
  assert not np.array_equal(f.arrivals(clients, 8)[0], dropped)


def test_receive_rejects_nonfinite_scalars_and_weights_only_arrivals():
  f = faults_lib.FaultModel(config_lib.Faults(nonfinite=0.3, dropout=0.5), num_clients=10, seed=0)
  scalars = np.ones((4, 3, 2), np.float32)
  weights = np.full_like(scalars, 0.5)
  weights[:, :, 1] = 0                                    # unused slots are never corrupted
  up = Uplink(np.zeros((4, 3, 2, 4), np.int32), scalars, weights)
  counts = np.array([10, 20, 30, 40], np.float32)
  got = channel.receive(up, counts, np.array([0, 1, 2, 3]), 5, f)
  assert np.all(np.isfinite(got.uplink.scalars))
  hit = got.uplink.weights[:, :, 0] == 0
  arrived = got.client_weights > 0
  assert hit.any() and got.metrics['rejected'] == int((hit & arrived[:, None]).sum())
  np.testing.assert_array_equal(got.uplink.scalars[:, :, 0][hit], 0)
  assert got.metrics['dropped'] == int((~arrived).sum()) and got.sent.sum() == arrived.sum()
  np.testing.assert_allclose(got.client_weights[arrived], counts[arrived] / counts[arrived].sum())
  none = channel.receive(up, counts, np.array([0, 1, 2, 3]), 5,
                         faults_lib.FaultModel(config_lib.Faults(dropout=0.99), num_clients=10))
  assert none.client_weights.sum() == 0


def test_a_round_in_which_every_client_drops_leaves_the_model_unchanged():
  c = tz.config('fedmezo')
  c.num_clients = 8
  c.faults = ml_collections.ConfigDict(dict(dropout=0.99, deadline=0.0, latency_sigma=0.5,
                                            byzantine=0.0, byzantine_scale=-10.0, nonfinite=0.0))
  alg = make_algorithm(c, tz.MODEL, tz.PUBLIC)
  state = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  before = tz.snapshot(state.trainable)
  state, result = alg.run_round(state, tz.round_batches(1), tz.COUNTS, tz.CLIENT_IDS, 1)
  for x, y in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(before)):
    np.testing.assert_array_equal(x, y)
  assert result.metrics['dropped'] == 3 and result.uplink_bytes.sum() == 0
  assert result.forwards.sum() == 0


def test_fault_and_aggregation_fields_are_validated():
  for bad, match in [(dict(dropout=1.0), 'dropout'), (dict(byzantine=-0.1), 'byzantine'),
                     (dict(deadline=-1.0), 'deadline'), (dict(nonfinite=2.0), 'nonfinite')]:
    with pytest.raises(ConfigError, match=match):
      config_lib.Faults(**bad)
  with pytest.raises(ConfigError, match='aggregation'):
    config_lib.Aggregation('mode')
  with pytest.raises(ConfigError, match='aggregation_trim'):
    config_lib.Aggregation('trimmed_mean', trim=0.7)
  c = tz.config('fedavg_bp')
  c.aggregation = 'median'
  with pytest.raises(ConfigError, match='scalar protocols'):
    make_algorithm(c, tz.MODEL)


# -- divergence guard ------------------------------------------------------------------------------

def _state(v, lr=0.1):
  return ServerState({'w': jnp.full(3, float(v))}, None, jnp.float32(lr))


def test_guard_rolls_back_to_the_last_vouched_model_and_halves_the_rate():
  guard = guard_lib.DivergenceGuard(spike=3.0, window=3, max_rollbacks=1)
  state = _state(0)
  for r, loss in enumerate([1.0, 0.9, 1.1, 2.5], 1):                  # no spike yet
    state, rolled = guard.after_round(guard_lib.copy_state(state), _state(r), loss, r)
    assert not rolled
  assert float(guard.good.trainable['w'][0]) == 3    # the model that entered round 4
  state, rolled = guard.after_round(guard_lib.copy_state(state), _state(5), None, 5)
  assert not rolled and float(state.trainable['w'][0]) == 5     # nobody reported: no verdict
  # median(0.9, 1.1, 2.5) = 1.1: 3.4 > 3 x 1.1 is a spike -> back to the model vouched for last.
  state, rolled = guard.after_round(guard_lib.copy_state(state), _state(6), 3.4, 6)
  assert rolled and float(state.trainable['w'][0]) == 3
  assert float(state.lr) == pytest.approx(0.05)
  with pytest.raises(TrainingError, match='rollbacks'):
    guard.after_round(guard_lib.copy_state(state), _state(7), float('nan'), 7)
  with pytest.raises(ConfigError, match='guard.spike'):
    config_lib.Guard(spike=0.5)


def test_guard_catches_a_blow_up_before_it_has_a_median():
  """lr 1e9: loss 3e9 in round 2 while the window is still filling; 10x the starting test loss
  (at least 1) is a blow-up, and the guard gives up after max_rollbacks."""
  guard = guard_lib.DivergenceGuard(spike=4.0, window=5, max_rollbacks=1, reference=0.69)
  state, rolled = guard.after_round(guard_lib.copy_state(_state(0)), _state(1), 0.7, 1)
  assert not rolled and not guard.is_spike(9.9)
  state, rolled = guard.after_round(guard_lib.copy_state(state), _state(2), 3e9, 2)
  assert rolled and float(state.trainable['w'][0]) == 0   # the model round 1's loss vouched for
  with pytest.raises(TrainingError, match='after 1 rollbacks'):
    guard.after_round(guard_lib.copy_state(state), _state(3), 11.0, 3)


# -- DP -------------------------------------------------------------------------------------------

def test_dp_clips_each_client_and_adds_seeded_noise():
  dp = GaussianPrivacy(clip=1.0, noise=1e-4, seed=1)
  scalars = np.array([[[3.0], [4.0]], [[0.3], [0.4]]], np.float32)        # norms 5 and 0.5
  up = Uplink(np.zeros((2, 2, 1, 4), np.int32), scalars, np.ones_like(scalars))
  out = dp.privatize(up, np.array([0, 1]), 1).scalars
  np.testing.assert_allclose(out[0, :, 0], [0.6, 0.8], atol=1e-3)         # clipped to norm 1
  np.testing.assert_allclose(out[1, :, 0], [0.3, 0.4], atol=1e-3)         # within the bound
  np.testing.assert_array_equal(out, dp.privatize(up, np.array([0, 1]), 1).scalars)
  assert not np.array_equal(out, dp.privatize(up, np.array([0, 1]), 2).scalars)


@pytest.mark.parametrize('noise, releases', [(1.0, 10), (2.0, 100), (0.8, 40)])
def test_dp_epsilon_is_the_gaussian_rdp_bound(noise, releases):
  """n releases of the Gaussian mechanism have RDP n a / (2 noise^2) at every order a; the
  accountant's (epsilon, delta) conversion (Canonne, Kamath, Steinke 2020) minimizes
  rdp + log((a-1)/a) - (log delta + log a) / (a - 1) over its grid of orders."""
  delta = 1e-5
  eps = GaussianPrivacy(clip=1.0, noise=noise, delta=delta).epsilon(releases)
  a = np.linspace(1.01, 2000, 400_000)
  bound = np.min(releases * a / (2 * noise ** 2) + np.log((a - 1) / a)
                 - (np.log(delta) + np.log(a)) / (a - 1))
  assert bound <= eps <= bound * 1.02, (eps, bound)
  assert GaussianPrivacy(clip=1.0, noise=noise).epsilon(0) == 0


# -- checkpoints ----------------------------------------------------------------------------------

def _tree(v):
  return {'w': jnp.full((64, 64), float(v)), 'step': jnp.int32(v)}


def test_checkpointer_skips_a_damaged_step_and_refuses_another_runs(tmp_path):
  logs = []
  ck = checkpoint_lib.Checkpointer(tmp_path / 'ck', keep=3, log=logs.append)
  for s in (1, 2, 3):
    ck.save(s, _tree(s), {'config': {'a': 1}})
  victim = max((tmp_path / 'ck' / '3' / 'state').rglob('*'),
               key=lambda p: p.stat().st_size if p.is_file() else -1)
  victim.write_bytes(b'\x07' * victim.stat().st_size)
  step, tree, meta = ck.restore(_tree(0))
  assert step == 2 and int(tree['step']) == 2 and meta['config'] == {'a': 1}
  assert logs and logs[0].startswith('checkpoint 3:')

  def other_run(meta):
    raise CheckpointError('not ours')

  with pytest.raises(CheckpointError, match='not ours'):
    ck.restore(_tree(0), check=other_run)
  ck.delete_after(2)
  assert ck.steps() == [1, 2]
  for step in (1, 2):                      # nothing usable left: restore says so (resume errors)
    (tmp_path / 'ck' / str(step) / 'meta' / 'metadata').write_text('{not json')
  assert ck.restore(_tree(0)) is None


_SAVER = '''
import sys, jax.numpy as jnp
from cooperllm_jax.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1], keep=2)
for s in range(1, 10000):
  ck.save(s, {'w': jnp.full((1024, 2048), float(s)), 'step': jnp.int32(s)}, {})
'''


@pytest.mark.slow
def test_a_crash_mid_write_never_leaves_a_checkpoint_that_restores_wrongly(tmp_path):
  """SIGKILL a process that saves 8 MiB checkpoints back to back, at random moments, three times:
  the newest listed step always restores whole, with the values saved at that step."""
  rng = np.random.default_rng()
  directory = tmp_path / 'ck'
  for _ in range(3):
    proc = subprocess.Popen([sys.executable, '-c', _SAVER, str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    while proc.poll() is None and not any(p.name.isdigit() for p in directory.glob('*')):
      time.sleep(0.05)
    time.sleep(rng.uniform(0.1, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step, tree, _ = checkpoint_lib.Checkpointer(directory).restore(
        {'w': jnp.zeros((1024, 2048)), 'step': jnp.int32(0)})
    assert int(tree['step']) == step and np.all(np.asarray(tree['w']) == step)


def test_config_differences_and_metrics_truncation(tmp_path):
  assert checkpoint_lib.config_differences({'a': 1, 'z': {'b': 2}}, {'a': 1, 'z': {'b': 3}}) == [
      'z.b: 2 -> 3']
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"round": 3, "x"')
  assert [r['round'] for r in truncate_metrics(path, 1)] == [0, 1]
  assert path.read_text() == '{"round": 0}\n{"round": 1}\n'


def _coroutine_in(path: str, name: str):
  """A coroutine function that raises, compiled as if it lived in the file `path`."""
  scope = {}
  exec(compile(f'async def {name}():\n  raise ValueError("a damaged array")\n', path, 'exec'),
       scope)
  return scope[name]


def test_checkpointer_drops_only_unawaited_failures_raised_in_orbax(tmp_path, caplog):
  """A damaged step's array reads may fail after restore() gave up on the step; asyncio then logs
  each unawaited failure (a task's or a gather's) with a traceback when it is collected: the CLI's
  one error line came with tracebacks, depending on the garbage collector. Only those records are
  dropped; an unawaited failure raised elsewhere is still logged."""
  checkpoint_lib.Checkpointer(tmp_path / 'checkpoints')
  read = _coroutine_in(os.path.join(checkpoint_lib.ORBAX_DIR, '_read.py'), 'read_array')
  other = _coroutine_in(str(tmp_path / 'elsewhere.py'), 'other_work')
  loop = asyncio.new_event_loop()
  try:
    with caplog.at_level(logging.ERROR, logger='asyncio'):
      async def start():   # a read's task, a gather of a read, and a task of other work
        return [asyncio.ensure_future(read()), asyncio.gather(read()),
                asyncio.ensure_future(other())]
      pending = loop.run_until_complete(start())
      loop.run_until_complete(asyncio.sleep(0.01))
      assert all(f.done() for f in pending)
      del pending
      gc.collect()
  finally:
    loop.close()
  unretrieved = [r.getMessage() for r in caplog.records
                 if 'exception was never retrieved' in r.getMessage()]
  assert len(unretrieved) == 1 and 'other_work' in unretrieved[0], unretrieved

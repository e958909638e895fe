"""The controls every CooperLLM result is measured against: cloud_only (the cloud alone: AdamW on
its public set) and warm_start (cloud_only's model, then FedMeZO on the clients). Each is checked
against an independent implementation of what its docstring says."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_zo_algorithms as tz
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.algorithms import make_algorithm
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo import Subset, overlay

ROUNDS, WARM = 4, 2


def _run(alg, rounds, batches=tz.round_batches):
  state = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  states, results = [tz.snapshot(state)], []
  for r in range(1, rounds + 1):
    state, result = alg.run_round(state, batches(r), tz.COUNTS, tz.CLIENT_IDS, r)
    states.append(tz.snapshot(state))
    results.append(result)
  return alg, state, states, results


def _adamw_on_public(rounds, lr, cloud):
  """The reference: optax AdamW on the head, one step per public batch of client_data's sampler,
  the optimizer state carried across rounds."""
  loss = make_loss(tz.MODEL)
  trainable, frozen = Subset('head').split(jax.tree.map(jnp.asarray, tz.PARAMS_NP),
                                           jax.random.key(0))
  opt = optax.adamw(lr, weight_decay=0.0)
  state = opt.init(trainable)
  grad = jax.jit(jax.grad(lambda t, b: loss(overlay(frozen, t), b)))
  out = []
  for r in range(1, rounds + 1):
    for batch in zip(*client_data.public_batches(tz.PUBLIC, cloud['batches'], cloud['batch_size'],
                                                 0, r).values()):
      b = dict(zip(('input_ids', 'attention_mask', 'labels'), batch))
      updates, state = opt.update(grad(trainable, b), state, trainable)
      trainable = optax.apply_updates(trainable, updates)
    out.append(tz.snapshot(trainable))
  return out


def test_cloud_only_is_adamw_on_the_public_set_and_never_reads_the_clients():
  lr = 3e-2
  alg, state, states, results = _run(make_algorithm(
      tz.config('cloud_only', learning_rate=lr), tz.MODEL, tz.PUBLIC), ROUNDS)
  cloud = dict(tz.config('cloud_only').cloud)
  want = _adamw_on_public(ROUNDS, lr, cloud)
  for r in range(ROUNDS):
    for x, y in zip(jax.tree.leaves(states[r + 1].trainable), jax.tree.leaves(want[r])):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # The clients' batches do not matter: garbage in their place gives the same model.
  garbage = lambda r: jax.tree.map(jnp.zeros_like, tz.round_batches(r))
  _, other, _, _ = _run(make_algorithm(tz.config('cloud_only', learning_rate=lr), tz.MODEL,
                                       tz.PUBLIC), ROUNDS, garbage)
  for x, y in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(other.trainable)):
    np.testing.assert_array_equal(x, y)
  for result in results:     # no client ran, sent or received anything; the cloud worked
    assert result.forwards.sum() == result.uplink_bytes.sum() == 0 and result.cloud_ran
    assert not result.client_weights.any() and result.uplink is None
  public_loss = jax.jit(make_loss(tz.MODEL))
  before, after = (float(public_loss(p, tz.PUBLIC)) for p in (tz.PARAMS_NP, alg.model_params(state)))
  assert after < before - 0.02, (before, after)   # it learns what its public data teaches


def test_warm_start_is_cloud_only_then_fedmezo_from_its_model():
  cloud_lr, zo_lr = 3e-3, 0.1
  config = tz.config('warm_start', learning_rate=zo_lr, warm={'rounds': WARM, 'then': 'fedmezo'})
  config.cloud.learning_rate = cloud_lr
  alg, _, states, results = _run(make_algorithm(config, tz.MODEL, tz.PUBLIC), ROUNDS)
  # The warm rounds are cloud_only's (at the cloud's rate) ...
  _, _, cloud_states, _ = _run(make_algorithm(tz.config('cloud_only', learning_rate=cloud_lr),
                                              tz.MODEL, tz.PUBLIC), WARM)
  for r in range(1, WARM + 1):
    for x, y in zip(jax.tree.leaves(states[r].trainable),
                    jax.tree.leaves(cloud_states[r].trainable)):
      np.testing.assert_array_equal(x, y)
    assert results[r - 1].cloud_ran and results[r - 1].uplink is None
  # ... and the later rounds FedMeZO's, started from the warm model.
  fedmezo = make_algorithm(tz.config('fedmezo', learning_rate=zo_lr), tz.MODEL)
  params = jax.tree.map(jnp.asarray, tz.PARAMS_NP)
  params = dict(params, head=jax.tree.map(jnp.asarray, states[WARM].trainable['head']))
  state = fedmezo.init(params)
  for r in range(WARM + 1, ROUNDS + 1):
    state, result = fedmezo.run_round(state, tz.round_batches(r), tz.COUNTS, tz.CLIENT_IDS, r)
    for x, y in zip(jax.tree.leaves(states[r].trainable), jax.tree.leaves(state.trainable)):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(results[r - 1].uplink.scalars, result.uplink.scalars)
    assert not results[r - 1].cloud_ran


def test_warm_start_with_the_whole_cloud_budget_starts_zo_from_cloud_only_final_model():
  """warm.cloud_rounds = rounds: the WARM cloud rounds spend cloud_only's ROUNDS rounds of steps,
  on the same batches in the same order, and the clock charges the cloud that much."""
  cloud_lr = 3e-3
  config = tz.config('warm_start', learning_rate=0.1,
                     warm={'rounds': WARM, 'then': 'fedmezo', 'cloud_rounds': ROUNDS})
  config.cloud.learning_rate = cloud_lr
  alg, _, states, results = _run(make_algorithm(config, tz.MODEL, tz.PUBLIC), WARM)
  want = _adamw_on_public(ROUNDS, cloud_lr, dict(config.cloud))
  for r in range(1, WARM + 1):     # warm round r holds cloud_only's round r * ROUNDS / WARM
    for x, y in zip(jax.tree.leaves(states[r].trainable),
                    jax.tree.leaves(want[r * ROUNDS // WARM - 1])):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert results[r - 1].cloud_ran
  one_a_round = make_algorithm(tz.config('warm_start', warm={'rounds': WARM}), tz.MODEL, tz.PUBLIC)
  assert (alg.costs.guidance.cloud_examples
          == ROUNDS // WARM * one_a_round.costs.guidance.cloud_examples > 0)


def test_baselines_reject_what_they_cannot_run():
  with pytest.raises(ConfigError, match='public'):
    make_algorithm(tz.config('cloud_only'), tz.MODEL, None)
  with pytest.raises(ConfigError, match='warm.then'):
    make_algorithm(tz.config('warm_start', warm={'then': 'fedavg_bp'}), tz.MODEL, tz.PUBLIC)
  with pytest.raises(ConfigError, match='warm.rounds'):
    make_algorithm(tz.config('warm_start', warm={'rounds': -1}), tz.MODEL, tz.PUBLIC)
  with pytest.raises(ConfigError, match='warm.cloud_rounds must be 0 or a multiple'):
    make_algorithm(tz.config('warm_start', warm={'rounds': 3, 'cloud_rounds': 4}), tz.MODEL,
                   tz.PUBLIC)


@pytest.mark.parametrize('mode', ['head', 'lora'])
def test_fedavg_bp_trains_the_runs_trainable_subset_only(mode):
  """The first-order bound on the same job as the ZO clients: only zo.trainable's leaves move."""
  config = tz.config('fedavg_bp', zo={'trainable': mode})
  alg, state, states, _ = _run(make_algorithm(config, tz.MODEL), 2)
  start = Subset(mode, lora_rank=4, lora_alpha=8.0).split(
      jax.tree.map(jnp.asarray, tz.PARAMS_NP), jax.random.key(0))
  assert jax.tree.structure(state.trainable) == jax.tree.structure(start[0])
  for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(start[1])):
    np.testing.assert_array_equal(x, y)                     # the frozen body never moves
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(state.trainable),
                                                      jax.tree.leaves(start[0])))
  assert tz.full_loss(alg.model_params(state)) < tz.full_loss(tz.PARAMS_NP)

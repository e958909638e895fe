"""fedavg_bp and per-round client data: determinism, weighting, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.algorithms import fedavg_bp
from cooperllm_jax.models import Encoder, EncoderConfig
from cooperllm_jax.models.common import make_loss

CFG = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_positions=16, num_labels=2)


def _task(n=64, t=8, seed=0):
  """Label = whether token 7 appears: learnable by a tiny encoder in a few steps."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, 50, (n, t)).astype(np.int32)
  labels = rng.integers(0, 2, n).astype(np.int32)
  ids[labels == 1, 1] = 7
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids)}, labels


def test_sampling_is_deterministic_and_valid():
  a = client_data.sample_clients(100, 10, seed=3, round_index=5)
  assert np.array_equal(a, client_data.sample_clients(100, 10, seed=3, round_index=5))
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
  assert not np.array_equal(a, client_data.sample_clients(100, 10, seed=3, round_index=6))
  with pytest.raises(ConfigError, match='clients_per_round=11'):
    client_data.sample_clients(10, 11, 0, 0)


def test_client_examples_come_only_from_the_client_and_cover_it():
  mine = np.array([3, 8, 20, 21, 40])
  idx = client_data.client_example_indices(mine, steps=4, batch_size=3, seed=0, round_index=1,
                                           client=2)
  assert idx.shape == (4, 3) and set(idx.ravel()) == set(mine)      # 12 draws cover all 5
  np.testing.assert_array_equal(
      idx, client_data.client_example_indices(mine, 4, 3, seed=0, round_index=1, client=2))


def test_round_with_one_client_equals_its_local_training():
  model = Encoder(CFG)
  params = model.init(jax.random.key(0))
  arrays, labels = _task()
  update = fedavg_bp.make_client_update(model, optax.sgd(0.1))
  batches, counts = client_data.round_batches(arrays, labels, [np.arange(64)], np.array([0]),
                                              steps=3, batch_size=8, seed=0, round_index=1)
  batches = jax.tree.map(jnp.asarray, batches)
  new, _ = fedavg_bp.make_round(update)(params, {}, batches, jnp.asarray(counts))
  delta, _ = jax.jit(update)(params, {}, jax.tree.map(lambda x: x[0], batches))
  jax.tree.map(lambda n, p, d: np.testing.assert_allclose(n, p + d, atol=1e-6), new, params, delta)


def test_round_weights_deltas_by_example_counts():
  model = Encoder(CFG)
  params = model.init(jax.random.key(1))
  arrays, labels = _task()
  update = fedavg_bp.make_client_update(model, optax.sgd(0.1))
  clients = [np.arange(0, 48), np.arange(48, 64)]
  batches, counts = client_data.round_batches(arrays, labels, clients, np.array([0, 1]), 2, 8, 0, 1)
  np.testing.assert_array_equal(counts, [48, 16])
  batches = jax.tree.map(jnp.asarray, batches)
  new, _ = fedavg_bp.make_round(update, chunk=2)(params, {}, batches, jnp.asarray(counts))
  d0, _ = update(params, {}, jax.tree.map(lambda x: x[0], batches))
  d1, _ = update(params, {}, jax.tree.map(lambda x: x[1], batches))
  jax.tree.map(lambda n, p, a, b: np.testing.assert_allclose(n, p + 0.75 * a + 0.25 * b, atol=1e-6),
               new, params, d0, d1)


def test_fedavg_learns_a_separable_task():
  model = Encoder(CFG)
  params = model.init(jax.random.key(2))
  arrays, labels = _task(n=128)
  round_fn = fedavg_bp.make_round(fedavg_bp.make_client_update(model, optax.adam(3e-3)))
  clients = np.array_split(np.arange(128), 4)
  loss = make_loss(model)
  full = jax.tree.map(jnp.asarray, {**arrays, 'labels': labels})
  before = float(loss(params, full))
  for r in range(1, 9):
    batches, counts = client_data.round_batches(arrays, labels, clients, np.arange(4), 4, 16, 0, r)
    params, _ = round_fn(params, {}, jax.tree.map(jnp.asarray, batches), jnp.asarray(counts))
  after = float(loss(params, full))
  accuracy = float((model.logits(params, full).argmax(-1) == full['labels']).mean())
  assert after < 0.5 * before and accuracy > 0.9, (before, after, accuracy)

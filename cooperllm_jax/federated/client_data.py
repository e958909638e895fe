"""Per-round client batches: which clients take part, and the examples each one trains on.

Everything is a deterministic function of (seed, round, client), so a run, a resumed run and the
edge's replay see the same data. Batches come out stacked as [clients, local_steps, batch, ...] so
one jitted call trains every sampled client.
"""

from typing import Sequence

import jax
import numpy as np

from cooperllm_jax.errors import ConfigError


def sample_clients(num_clients: int, per_round: int, seed: int, round_index: int) -> np.ndarray:
  """Sorted ids of the clients taking part in a round, without replacement.

  Args:
    num_clients: how many clients there are.
    per_round: how many take part, in [1, num_clients].
    seed: the run's seed.
    round_index: the round (1-based); the sample is a function of (seed, round_index).

  Returns:
    The sorted client ids, int64 [per_round].
  """
  if not 1 <= per_round <= num_clients:
    raise ConfigError(f'clients_per_round={per_round} must be in [1, num_clients={num_clients}]')
  rng = np.random.default_rng([seed, round_index, 0x5A3])
  return np.sort(rng.choice(num_clients, per_round, replace=False))


def client_example_indices(client_indices: np.ndarray, steps: int, batch_size: int, seed: int,
                           round_index: int, client: int) -> np.ndarray:
  """[steps, batch] dataset indices: passes over a fresh permutation of the client's data."""
  rng = np.random.default_rng([seed, round_index, client, 0xDA7A])
  need = steps * batch_size
  passes = -(-need // len(client_indices))
  order = np.concatenate([rng.permutation(client_indices) for _ in range(passes)])
  return order[:need].reshape(steps, batch_size)


def round_batches(arrays: dict, labels: np.ndarray, clients: Sequence[np.ndarray],
                  sampled: np.ndarray, steps: int, batch_size: int, seed: int,
                  round_index: int) -> tuple[dict, np.ndarray]:
  """Stacked batches {name: [C, steps, batch, ...]} of the `sampled` clients and their counts.

  Args:
    arrays: the tokenized dataset (tokenize_texts); its 'input_ids' and 'attention_mask' are used.
    labels: the dataset's labels [N].
    clients: clients[c] is client c's example indices (Partition.clients).
    sampled: the C sampled client ids (sample_clients).
    steps: local steps per client.
    batch_size: examples per step.
    seed: the run's seed.
    round_index: the round (1-based); each client's examples are passes over a fresh
      permutation of its data, a function of (seed, round_index, client).

  Returns:
    (batches, counts): batches {'input_ids', 'attention_mask': [C, steps, batch, L] in the
    arrays' dtype; 'labels': int32 [C, steps, batch]}; counts float32 [C], each client's
    example count (the FedAvg weights).
  """
  idx = np.stack([client_example_indices(clients[c], steps, batch_size, seed, round_index, int(c))
                  for c in sampled])
  batches = {k: v[idx] for k, v in arrays.items() if k in ('input_ids', 'attention_mask')}
  batches['labels'] = labels[idx].astype(np.int32)
  counts = np.array([len(clients[c]) for c in sampled], np.float32)
  return batches, counts


def round_shapes(arrays: dict, steps: int, batch_size: int) -> dict:
  """Abstract shapes of one client's batches {name: [steps, batch, ...]} (for memory analysis)."""
  shapes = {k: jax.ShapeDtypeStruct((steps, batch_size) + arrays[k].shape[1:], arrays[k].dtype)
            for k in ('input_ids', 'attention_mask')}
  shapes['labels'] = jax.ShapeDtypeStruct((steps, batch_size), np.int32)
  return shapes


def public_set(arrays: dict, labels: np.ndarray, public: np.ndarray, *, examples: int = 0,
               classes: Sequence[int] = (), shuffle_labels: bool = False, seed: int = 0) -> dict:
  """The cloud's public data {input_ids, attention_mask, labels}, with the ablations' controls.

  Args:
    arrays: the tokenized dataset (tokenize_texts); its 'input_ids' and 'attention_mask' are used.
    labels: the dataset's labels [N].
    public: the public set's indices (Partition.public).
    examples: keep at most this many (a stratified-agnostic random subset; 0 = all).
    classes: keep only these labels (domain mismatch: the cloud sees another label mix);
      empty keeps all.
    shuffle_labels: permute the labels (a control: the cloud's gradient carries no task signal).
    seed: seed of the subset and the permutation.

  Returns:
    {'input_ids', 'attention_mask': [n, L] as in `arrays`; 'labels': int32 [n]} for the n kept
    examples.
  """
  idx = np.asarray(public)
  rng = np.random.default_rng([seed, 0xC10D])
  if len(classes):
    unknown = sorted(set(int(c) for c in classes) - set(np.unique(labels).tolist()))
    if unknown:
      raise ConfigError(f'cloud.public_classes names labels {unknown} that the dataset lacks')
    idx = idx[np.isin(labels[idx], np.asarray(classes))]
  if examples < 0:
    raise ConfigError(f'cloud.public_examples must be >= 0, got {examples}')
  if examples:
    idx = np.sort(rng.choice(idx, min(examples, len(idx)), replace=False))
  if not len(idx):
    raise ConfigError('the cloud has no public examples: raise public_fraction or widen '
                      'cloud.public_classes')
  out = {k: arrays[k][idx] for k in ('input_ids', 'attention_mask')}
  out['labels'] = labels[idx].astype(np.int32)
  if shuffle_labels:
    out['labels'] = rng.permutation(out['labels'])
  return out


def public_batches(public: dict, num_batches: int, batch_size: int, seed: int,
                   round_index: int) -> dict:
  """{name: [K, B, ...]}: the cloud's batches for a round, a deterministic function of the round
  (without replacement while the public set lasts).

  Args:
    public: the cloud's public data (public_set).
    num_batches: K, the batches per round.
    batch_size: B, the examples per batch.
    seed: the run's seed.
    round_index: the round (1-based).

  Returns:
    {name: [K, B, ...]} for every entry of `public`, in its dtype.
  """
  rng = np.random.default_rng([seed, round_index, 0xC10D])
  n = len(public['labels'])
  need = num_batches * batch_size
  order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
  return {k: v[order.reshape(num_batches, batch_size)] for k, v in public.items()}

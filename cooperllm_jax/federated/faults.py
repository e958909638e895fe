"""Simulated faults between the clients and the edge.

Every fault is a deterministic function of (seed, round, client), so an uninterrupted run, a resumed
run and the ledger replay see the same faults, and a client's fate does not depend on who else was
sampled:

  dropout      each sampled client goes offline for the round with this probability (sends nothing);
  stragglers   a client's latency is speed_c * jitter_(c, r), both exp(N(0, latency_sigma^2)) (a
               fixed per-client device speed and per-round network jitter; nominal latency 1);
               with a deadline > 0 the edge drops uploads that arrive later (they were sent);
  byzantine    a fixed fraction of the clients (ids drawn once from the seed) multiply every scalar
               they send by byzantine_scale (-1: sign flip; -10: sign flip and x10);
  nonfinite    each sent scalar arrives as NaN, +Inf or -Inf with this probability.

The channel (federated/channel.py) applies them between the clients and the edge.
"""

import dataclasses
from typing import Optional

import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.federated.clients import Uplink

# Stream tags, so each fault draws from its own random stream.
_DROPOUT, _SPEED, _JITTER, _BYZANTINE, _NONFINITE = 0xD80, 0x5EED, 0x717, 0xB12, 0x4A4


@dataclasses.dataclass(frozen=True)
class FaultModel:
  """The faults of config.Faults for a run's clients, as deterministic functions of the seed."""
  spec: config_lib.Faults
  num_clients: int
  seed: int = 0

  @classmethod
  def of(cls, spec: config_lib.Faults, num_clients: int, seed: int) -> Optional['FaultModel']:
    """The run's fault model, None when every fault is off."""
    return cls(spec, num_clients, seed) if spec.active else None

  @property
  def corrupts(self) -> bool:
    return self.spec.corrupts

  @property
  def byzantine_ids(self) -> np.ndarray:
    n = int(round(self.spec.byzantine * self.num_clients))
    rng = np.random.default_rng([self.seed, _BYZANTINE])
    return np.sort(rng.choice(self.num_clients, n, replace=False))

  def latency(self, client: int, round_index: int) -> float:
    speed = np.random.default_rng([self.seed, client, _SPEED]).normal()
    jitter = np.random.default_rng([self.seed, round_index, client, _JITTER]).normal()
    return float(np.exp(self.spec.latency_sigma * (speed + jitter)))

  def arrivals(self, clients, round_index: int):
    """(dropped, late): bool [C] for the round's sampled clients."""
    dropped = np.array([np.random.default_rng([self.seed, round_index, int(c), _DROPOUT]).random()
                        < self.spec.dropout for c in clients], bool)
    deadline = self.spec.deadline
    late = np.array([bool(deadline) and self.latency(int(c), round_index) > deadline
                     for c in clients], bool) & ~dropped
    return dropped, late

  def corrupt(self, uplink: Uplink, clients, round_index: int) -> Uplink:
    """What arrives: Byzantine clients' scalars scaled, and non-finite scalars from the channel."""
    scalars = np.array(uplink.scalars, np.float32, copy=True)
    byzantine = np.isin(clients, self.byzantine_ids)
    scalars[byzantine] *= np.float32(self.spec.byzantine_scale)
    if self.spec.nonfinite:
      for i, c in enumerate(clients):
        rng = np.random.default_rng([self.seed, round_index, int(c), _NONFINITE])
        hit = (rng.random(scalars[i].shape) < self.spec.nonfinite) & (uplink.weights[i] > 0)
        scalars[i][hit] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), hit.sum())
    return uplink._replace(scalars=scalars)

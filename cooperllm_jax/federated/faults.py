"""Simulated faults between the clients and the edge, and the edge's guards against them.

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

The edge (`receive`) rejects non-finite scalars (weight 0 and scalar 0, so 0 * NaN never reaches
the model; counted), FedAvg-weights only the clients whose uploads arrived in time, and then
aggregates as configured (zo.Aggregation). `DivergenceGuard` rolls the model back on loss spikes.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax.errors import ConfigError, TrainingError
from cooperllm_jax.federated.zo import Uplink

# Stream tags, so each fault draws from its own random stream.
_DROPOUT, _SPEED, _JITTER, _BYZANTINE, _NONFINITE = 0xD80, 0x5EED, 0x717, 0xB12, 0x4A4


def _fraction(name, value, upper=1.0):
  if not 0.0 <= value <= upper:
    raise ConfigError(f'faults.{name} must be in [0, {upper}], got {value}')


@dataclasses.dataclass(frozen=True)
class Faults:
  num_clients: int
  seed: int = 0
  dropout: float = 0.0
  deadline: float = 0.0
  latency_sigma: float = 0.5
  byzantine: float = 0.0
  byzantine_scale: float = -10.0
  nonfinite: float = 0.0

  def __post_init__(self):
    _fraction('dropout', self.dropout, upper=0.99)
    _fraction('byzantine', self.byzantine)
    _fraction('nonfinite', self.nonfinite)
    if not self.deadline >= 0:
      raise ConfigError(f'faults.deadline must be >= 0 (0 = no deadline), got {self.deadline}')
    if not self.latency_sigma >= 0:
      raise ConfigError(f'faults.latency_sigma must be >= 0, got {self.latency_sigma}')
    if not np.isfinite(self.byzantine_scale):
      raise ConfigError(f'faults.byzantine_scale must be finite, got {self.byzantine_scale}')

  @classmethod
  def from_config(cls, config) -> Optional['Faults']:
    """The config's faults section (None when absent or all off)."""
    f = config.get('faults')
    if f is None:
      return None
    faults = cls(config.num_clients, config.seed, f.dropout, f.deadline, f.latency_sigma,
                 f.byzantine, f.byzantine_scale, f.nonfinite)
    return faults if faults.active else None

  @property
  def active(self) -> bool:
    return bool(self.dropout or self.deadline or self.byzantine or self.nonfinite)

  @property
  def corrupts(self) -> bool:
    """Whether any fault alters the scalars (only the scalar protocols can be attacked that way)."""
    return bool(self.byzantine or self.nonfinite)

  @property
  def byzantine_ids(self) -> np.ndarray:
    n = int(round(self.byzantine * self.num_clients))
    rng = np.random.default_rng([self.seed, _BYZANTINE])
    return np.sort(rng.choice(self.num_clients, n, replace=False))

  def latency(self, client: int, round_index: int) -> float:
    speed = np.random.default_rng([self.seed, client, _SPEED]).normal()
    jitter = np.random.default_rng([self.seed, round_index, client, _JITTER]).normal()
    return float(np.exp(self.latency_sigma * (speed + jitter)))

  def arrivals(self, clients, round_index: int):
    """(dropped, late): bool [C] for the round's sampled clients."""
    dropped = np.array([np.random.default_rng([self.seed, round_index, int(c), _DROPOUT]).random()
                        < self.dropout for c in clients], bool)
    late = np.array([bool(self.deadline) and self.latency(int(c), round_index) > self.deadline
                     for c in clients], bool) & ~dropped
    return dropped, late

  def corrupt(self, uplink: Uplink, clients, round_index: int) -> Uplink:
    """What arrives: Byzantine clients' scalars scaled, and non-finite scalars from the channel."""
    scalars = np.array(uplink.scalars, np.float32, copy=True)
    byzantine = np.isin(clients, self.byzantine_ids)
    scalars[byzantine] *= np.float32(self.byzantine_scale)
    if self.nonfinite:
      for i, c in enumerate(clients):
        rng = np.random.default_rng([self.seed, round_index, int(c), _NONFINITE])
        hit = (rng.random(scalars[i].shape) < self.nonfinite) & (uplink.weights[i] > 0)
        scalars[i][hit] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), hit.sum())
    return uplink._replace(scalars=scalars)


@dataclasses.dataclass
class Received:
  """What the edge aggregates: the uplinks as received (non-finite entries rejected), the FedAvg
  weights of the clients that arrived in time, and what happened on the way (counts)."""
  uplink: Optional[Uplink]
  client_weights: np.ndarray   # float32 [C]; 0 for clients that dropped out or were late
  sent: np.ndarray             # bool [C]: the client uploaded (late ones did, dropped ones not)
  metrics: dict


def receive(uplink: Optional[Uplink], counts, clients, round_index: int,
            faults: Optional[Faults] = None, privacy=None) -> Received:
  """The channel and the edge's intake for one round. uplink: the clients' honest uploads (None for
  dense protocols); privacy: a privacy.GaussianPrivacy the honest clients apply before sending."""
  clients = np.asarray(clients)
  counts = np.asarray(counts, np.float32)
  dropped = late = np.zeros(len(clients), bool)
  metrics = {}
  if uplink is not None and privacy is not None:
    uplink = privacy.privatize(uplink, clients, round_index)
  if faults is not None:
    dropped, late = faults.arrivals(clients, round_index)
    metrics.update(dropped=int(dropped.sum()), late=int(late.sum()))
    if uplink is not None and faults.corrupts:
      uplink = faults.corrupt(uplink, clients, round_index)
      metrics['byzantine'] = int(np.isin(clients, faults.byzantine_ids).sum())
  arrived = ~(dropped | late)
  if uplink is not None:
    ok = np.isfinite(uplink.scalars)
    bad = ~ok & (uplink.weights > 0) & arrived[:, None, None]
    metrics['rejected'] = int(bad.sum())
    uplink = Uplink(np.asarray(uplink.addresses),
                    np.where(ok, uplink.scalars, 0).astype(np.float32),
                    np.where(ok, uplink.weights, 0).astype(np.float32))
  kept = counts * arrived
  total = kept.sum()
  weights = (kept / total if total > 0 else kept).astype(np.float32)
  return Received(uplink, weights, ~dropped, metrics)


def copy_state(state):
  """A copy of an algorithm state that survives the next round's donation; the frozen weights are
  never donated or changed, so they are shared, not copied."""
  return {k: v if k == 'frozen' else jax.tree.map(jnp.copy, v) for k, v in state.items()}


@dataclasses.dataclass
class DivergenceGuard:
  """Rolls back when a round's train loss spikes: loss > spike x the median of the last `window`
  accepted losses (checked once `window` are in), a blow-up (loss > BLOWUP x the test loss of the
  model the run started from, at least 1: checked from the first round, when there is no median
  yet), or a non-finite loss. After `max_rollbacks` it gives up with a TrainingError.

  Round r's loss is measured by the clients at the model that entered round r, so a spike means
  that model is bad: the guard returns the model that entered the last accepted round (the newest
  one a loss vouched for) with the learning rate halved, and round r's update is dropped. Costs two
  copies of the (non-frozen) state: `good` and the round's entering state.
  """
  BLOWUP = 10.0

  spike: float
  window: int = 5
  max_rollbacks: int = 5
  reference: Optional[float] = None   # the starting model's test loss (the run sets it)
  good: Optional[dict] = None
  losses: list = dataclasses.field(default_factory=list)
  rollbacks: int = 0

  def __post_init__(self):
    if not self.spike > 1:
      raise ConfigError(f'guard.spike must be > 1 (or 0 = off), got {self.spike}')
    if self.window < 1:
      raise ConfigError(f'guard.window must be >= 1, got {self.window}')
    if self.max_rollbacks < 0:
      raise ConfigError(f'guard.max_rollbacks must be >= 0, got {self.max_rollbacks}')

  @classmethod
  def from_config(cls, config) -> Optional['DivergenceGuard']:
    g = config.get('guard')
    if g is None or not g.spike:
      return None
    return cls(g.spike, g.window, g.max_rollbacks)

  def is_spike(self, loss: float) -> bool:
    if not np.isfinite(loss):
      return True
    if self.reference is not None and loss > self.BLOWUP * max(self.reference, 1.0):
      return True
    recent = self.losses[-self.window:]
    return len(recent) == self.window and loss > self.spike * float(np.median(recent))

  def after_round(self, entering, state, loss: Optional[float], round_index: int):
    """(state to continue from, rolled back?). entering: a copy_state of the state that entered
    the round; loss: the round's mean train loss over the clients that reported (None: nobody did,
    so nothing is judged)."""
    if self.good is None:
      self.good = entering
    if loss is None:
      return state, False
    if not self.is_spike(loss):
      self.good = entering
      self.losses.append(float(loss))
      return state, False
    self.rollbacks += 1
    if self.rollbacks > self.max_rollbacks:
      raise TrainingError(f'training loss spiked to {loss} in round {round_index} after '
                          f'{self.max_rollbacks} rollbacks; lower learning_rate')
    return dict(copy_state(self.good), lr=state['lr'] * 0.5), True

  def to_json(self) -> dict:
    return {'losses': self.losses, 'rollbacks': self.rollbacks}

  def load(self, good, saved: dict) -> None:
    self.good, self.losses, self.rollbacks = good, list(saved['losses']), saved['rollbacks']

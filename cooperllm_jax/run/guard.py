"""The divergence guard: rolls the model back when a round's training loss spikes."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import TrainingError
from cooperllm_jax.federated.api import ServerState


def copy_state(state: ServerState) -> ServerState:
  """A copy of an algorithm state that survives the next round's donation; the frozen weights are
  never donated or changed, so they are shared, not copied."""
  return jax.tree.map(jnp.copy, state._replace(frozen=None))._replace(frozen=state.frozen)


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
  good: Optional[ServerState] = None
  losses: list = dataclasses.field(default_factory=list)
  rollbacks: int = 0

  @classmethod
  def of(cls, spec: config_lib.Guard) -> Optional['DivergenceGuard']:
    """The run's guard (config.Guard validated its values); None when guard.spike = 0."""
    return cls(spec.spike, spec.window, spec.max_rollbacks) if spec.active else None

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
    return copy_state(self.good)._replace(lr=state.lr * 0.5), True

  def to_json(self) -> dict:
    return {'losses': self.losses, 'rollbacks': self.rollbacks}

  def load(self, good, saved: dict) -> None:
    self.good, self.losses, self.rollbacks = good, list(saved['losses']), saved['rollbacks']

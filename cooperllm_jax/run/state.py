"""RunState: everything a run carries from round to round, saved and restored as one object."""

import dataclasses
from typing import Optional

import numpy as np

from cooperllm_jax.checkpoint import RunStore
from cooperllm_jax.federated.accounting import DownlinkTracker
from cooperllm_jax.federated.api import ServerState
from cooperllm_jax.run.guard import DivergenceGuard
from cooperllm_jax.system.clock import SimulatedClock


@dataclasses.dataclass
class RunState:
  state: ServerState            # the algorithm's state
  downlink: DownlinkTracker     # what each client must download to catch up
  clock: SimulatedClock         # the simulated wall clock (elapsed seconds)
  releases: np.ndarray          # int64 [clients]: uploads per client (DP accounting)
  guard: Optional[DivergenceGuard] = None
  round: int = 0                # the last finished round
  seconds_before: float = 0.0   # training seconds of the runs this one resumes
  before: Optional[dict] = None  # the starting model's test accuracy, loss and examples

  def save(self, store: RunStore, seconds: float) -> None:
    """A checkpoint of this state at self.round; seconds: training time of this process so far."""
    guard = self.guard
    store.save(self.round, self.state, guard.good if guard is not None else None, {
        'downlink': self.downlink.to_json(), 'releases': self.releases.tolist(),
        'guard': guard.to_json() if guard is not None else None,
        'train_seconds': self.seconds_before + seconds, 'sim_time_s': self.clock.elapsed,
        'before': self.before})

  def restore(self, store: RunStore) -> None:
    """This state from the store's newest good checkpoint (which deletes anything newer)."""
    guard = self.guard
    self.round, self.state, good, meta = store.restore(self.state, guard is not None)
    if guard is not None:
      guard.load(good, meta['guard'])
    self.downlink.load(meta['downlink'])
    self.releases = np.asarray(meta['releases'], np.int64)
    self.seconds_before = meta['train_seconds']
    self.clock.elapsed = meta.get('sim_time_s', 0.0)
    self.before = meta['before']   # RunStore.check refuses checkpoints without it

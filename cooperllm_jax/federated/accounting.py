"""Downlink accounting: what a sampled client must receive to hold the current global model.

A client that last synced at the start of round r0 needs the broadcasts of rounds r0 .. r-1 (for the
scalar protocols: those rounds' ledgers), or the dense trainable weights if that is cheaper. Every
client starts synced at round 1 (it has the pretrained model). FedKSeed-style protocols, whose model
is a function of K fixed accumulators, sync with one fixed-size message whatever was missed.
"""

import numpy as np


class DownlinkTracker:
  """sync_bytes: the fixed message of a stateless protocol (None: replay the missed rounds)."""

  def __init__(self, num_clients: int, dense_bytes: int, sync_bytes=None):
    self.dense_bytes = int(dense_bytes)
    self.sync_bytes = sync_bytes
    self.synced = np.ones(num_clients, np.int64)  # round at whose start each client was in sync
    self.broadcasts = [0]                           # broadcasts[r] = bytes of round r's update

  def download(self, sampled, round_index: int) -> np.ndarray:
    """Bytes each sampled client downloads at the start of round_index."""
    if round_index == 1:
      need = np.zeros(len(sampled), np.int64)
    elif self.sync_bytes is not None:
      need = np.full(len(sampled), self.sync_bytes, np.int64)
    else:
      cumulative = np.cumsum(self.broadcasts)
      need = cumulative[round_index - 1] - cumulative[self.synced[sampled] - 1]
    self.synced[sampled] = round_index
    return np.minimum(need, self.dense_bytes).astype(np.int64)

  def record(self, round_index: int, broadcast_bytes: int) -> None:
    """The size of round_index's update as broadcast (rounds are recorded in order)."""
    if len(self.broadcasts) != round_index:
      raise ValueError(f'round {round_index} recorded out of order')
    self.broadcasts.append(int(broadcast_bytes))

  def to_json(self) -> dict:
    """The tracker's state for a checkpoint."""
    return {'synced': self.synced.tolist(), 'broadcasts': self.broadcasts}

  def load(self, saved: dict) -> None:
    self.synced = np.asarray(saved['synced'], np.int64)
    self.broadcasts = [int(b) for b in saved['broadcasts']]

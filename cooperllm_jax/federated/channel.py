"""The channel between the clients and the edge: what leaves the clients, what the edge receives.

One round's uploads pass, in order, through the clients' optional DP (federated/privacy.py), the
simulated faults (federated/faults.py: dropouts, stragglers past a deadline, Byzantine clients,
non-finite scalars), and the edge's intake: it rejects non-finite scalars (weight 0 and scalar 0,
so 0 * NaN never reaches the model; counted) and FedAvg-weights only the clients whose uploads
arrived in time. The edge (federated/edge.py) then aggregates what arrived.
"""

import dataclasses
from typing import Optional

import numpy as np

from cooperllm_jax.federated.clients import Uplink
from cooperllm_jax.federated.faults import FaultModel
from cooperllm_jax.federated.privacy import GaussianPrivacy


@dataclasses.dataclass(frozen=True)
class Channel:
  """The round's transforms of the uplink: DP at the clients, then the simulated faults (either
  None: off). Dense protocols (fedavg_bp) pass uplink=None: only arrivals apply."""
  faults: Optional[FaultModel] = None
  privacy: Optional[GaussianPrivacy] = None

  def __call__(self, uplink: Optional[Uplink], counts, clients, round_index: int,
               missing=None) -> 'Received':
    return receive(uplink, counts, clients, round_index, self.faults, self.privacy, missing)


@dataclasses.dataclass
class Received:
  """What the edge aggregates: the uplinks as received (non-finite entries rejected), the FedAvg
  weights of the clients that arrived in time, and what happened on the way (counts)."""
  uplink: Optional[Uplink]
  client_weights: np.ndarray   # float32 [C]; 0 for clients that dropped out or were late
  sent: np.ndarray             # bool [C]: the client uploaded (late ones did, dropped ones not)
  metrics: dict


def receive(uplink: Optional[Uplink], counts, clients, round_index: int,
            faults: Optional[FaultModel] = None,
            privacy: Optional[GaussianPrivacy] = None, missing=None) -> Received:
  """The channel and the edge's intake for one round. uplink: the clients' honest uploads (None for
  dense protocols); privacy: the DP the honest clients apply before sending; missing: bool [C],
  the clients whose replies did not reach the edge (a deployment's transport): dropouts, counted
  in the metrics as `missing`."""
  clients = np.asarray(clients)
  counts = np.asarray(counts, np.float32)
  late = np.zeros(len(clients), bool)
  dropped = np.zeros(len(clients), bool) if missing is None else np.asarray(missing, bool)
  metrics = {'missing': int(dropped.sum())} if dropped.any() else {}
  if uplink is not None and privacy is not None:
    uplink = privacy.privatize(uplink, clients, round_index)
  if faults is not None:
    simulated, late = faults.arrivals(clients, round_index)
    dropped, late = dropped | simulated, late & ~dropped
    metrics.update(dropped=int(simulated.sum()), late=int(late.sum()))
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

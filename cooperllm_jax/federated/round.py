"""The one round path of the scalar protocols: clients -> channel -> edge.

The clients' local training runs in one jitted call (federated/clients.py: lax.map over the
sampled clients, optionally split over the mesh's 'clients' axis), the uploads pass through the
channel on the host (federated/channel.py: DP, simulated faults, the edge's intake), and the edge
replays what arrived in a second jitted call (federated/edge.py), updating the global trainable
weights in place. The CLI's algorithms and a user's own loop run this same `Round`, so both get the
same edge server; the pieces (`make_clients_fn`, `edge_replay`, `Round.edge_fn`) stay pure and
jittable for users (and algorithms: algorithms/scalar.py) who fuse the edge's update into a larger
step of their own.
"""

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import mesh as mesh_lib
from cooperllm_jax.config import Aggregation
from cooperllm_jax.federated.channel import Channel, Received
from cooperllm_jax.federated.clients import ClientUpdate, Uplink, make_clients_fn
from cooperllm_jax.federated.edge import edge_replay
from cooperllm_jax.tree_math import PyTree
from cooperllm_jax.zoo.guided import Guidance


class RoundOutput(NamedTuple):
  trainable: Any                # the global trainable weights after the edge's update
  uplinks: Uplink               # what the clients sent, [C, S, P, ...] (host arrays)
  losses: np.ndarray            # [C, S] the clients' training losses
  received: Received            # what the edge used: uplinks as received, FedAvg weights, counts


class Round:
  """round(trainable, frozen, batches, counts, clients, round_index, lr, *extra, guide=None)
  -> RoundOutput; `trainable` is donated unless donate=False.

  batches {name: [C, S, B, ...]}; counts float32 [C] (FedAvg weights); clients int32 [C];
  round_index: 1-based, as the CLI numbers rounds (round 0 is the starting model's evaluation);
  the probe keys are functions of (seed, round, client, step, probe), so the same numbering gives
  the same bits. extra: further client_update args (e.g. FwdLLM's previous update); guide: the
  round's ZGR guidance (make_guidance), used by every client and by the edge's replay.
  backend='loop' runs one jitted call per client (for debugging); with a mesh the clients are
  split over its 'clients' axis. `distribution` must be the Estimator's (the edge regenerates its
  directions).
  """

  def __init__(self, client_update: ClientUpdate, *, seed: int, chunk: int = 1,
               mesh: Optional[jax.sharding.Mesh] = None, backend: str = 'map',
               distribution: str = 'gaussian', shared: bool = False,
               aggregation: Aggregation = Aggregation(), channel: Channel = Channel(),
               donate: bool = True):
    self.seed, self.mesh, self.backend, self.channel = seed, mesh, backend, channel
    self.clients = jax.jit(make_clients_fn(client_update, seed=seed, chunk=chunk, mesh=mesh))
    self.client = jax.jit(client_update)
    self._replay = functools.partial(edge_replay, seed=seed, distribution=distribution,
                                     shared=shared, aggregation=aggregation)
    self._edge = jax.jit(self.edge_fn, donate_argnums=0 if donate else ())

  def edge_fn(self, trainable: PyTree, uplinks: Uplink, client_weights: jax.Array, lr: jax.Array,
              guide: Optional[Guidance] = None) -> PyTree:
    """The edge's update, traceable: `edge` is its jitted form, and an algorithm whose edge also
    updates a state of its own traces both in one jitted call."""
    new = self._replay(trainable, uplinks=uplinks, client_weights=client_weights, lr=lr,
                       guide=guide)
    if self.mesh is not None:  # every device replays the gathered scalars: stays replicated
      new = jax.lax.with_sharding_constraint(new, mesh_lib.replicated(self.mesh))
    return new

  def edge(self, trainable: PyTree, uplinks: Uplink, client_weights: jax.Array, lr: float,
           guide: Optional[Guidance] = None) -> PyTree:
    """The edge's update of the global trainable weights from one round's received uplinks; the
    ledger replay (experiments/replay.py) calls this same function."""
    return self._edge(trainable, uplinks, client_weights, lr, guide)

  def local_training(self, trainable: PyTree, frozen: PyTree, batches: dict, clients: jax.Array,
                     round_index: jax.Array, lr: float, *extra: Any,
                     guide: Optional[Guidance] = None) -> tuple[Uplink, jax.Array]:
    """(uplinks [C, S, P, ...], losses [C, S]) of the sampled clients' local training."""
    if self.backend == 'map':
      return self.clients(trainable, frozen, batches, clients, round_index, lr, *extra,
                          guide=guide)
    guided = {} if guide is None else {'guide': guide}
    outs = []
    for i in range(len(clients)):
      b = jax.tree.map(lambda x: x[i], batches)
      _, uplink, losses = self.client(trainable, frozen, b, self.seed, round_index, clients[i],
                                      lr, *extra, **guided)
      outs.append((uplink, losses))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  def receive(self, trainable: PyTree, frozen: PyTree, batches: dict, counts: Any, clients: Any,
              round_index: int, lr: float, *extra: Any,
              guide: Optional[Guidance] = None) -> tuple[Uplink, np.ndarray, Received]:
    """The round up to the edge: (what the clients sent [C, S, P, ...] and their losses [C, S],
    host arrays; what reached the edge through the channel)."""
    ids = np.asarray(clients, np.int32)
    args = (batches, jnp.asarray(counts, jnp.float32), jnp.asarray(ids), jnp.int32(round_index))
    if self.mesh is not None:
      args = mesh_lib.place_round(self.mesh, *args)
    uplinks, losses = self.local_training(trainable, frozen, args[0], args[2], args[3], lr, *extra,
                                          guide=guide)
    sent = jax.tree.map(np.asarray, uplinks)
    return sent, np.asarray(losses), self.channel(sent, counts, ids, int(round_index))

  def __call__(self, trainable: PyTree, frozen: PyTree, batches: dict, counts: Any, clients: Any,
               round_index: int, lr: float, *extra: Any,
               guide: Optional[Guidance] = None) -> RoundOutput:
    sent, losses, received = self.receive(trainable, frozen, batches, counts, clients, round_index,
                                          lr, *extra, guide=guide)
    new = self.edge(trainable, received.uplink, received.client_weights, lr, guide)
    return RoundOutput(new, sent, losses, received)


# The factory name the package exports (cj.make_round), as optax names its transformations.
make_round = Round

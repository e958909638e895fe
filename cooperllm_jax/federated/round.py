"""The one round path of the scalar protocols: clients -> channel -> edge.

The edge's round is two pure steps around whatever carries its messages: `Messages` (what the
edge sends the sampled clients) and `Round.apply(trainable, messages, replies)` (the replies that
arrived through the channel, then the edge's update); a client whose reply did not arrive is a
dropout (FedAvg weight 0). `Round.run_clients` computes the replies in this process, and a
deployment's transport delivers them instead, so both run the same edge.

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
from typing import Any, NamedTuple, Optional, Sequence

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


class Messages(NamedTuple):
  """What the edge sends for one round, whatever carries it: every sampled client gets its id, the
  round, the rate, the protocol's further client_update arguments and the guidance, and keeps the
  global weights in step itself (the previous rounds' broadcast ledger).

  Attributes:
    round_index: the round, numbered from 1.
    clients: int32 [C], the sampled clients, in the order of the replies.
    counts: float32 [C], their example counts (the FedAvg weights).
    lr: float32 scalar, the round's rate.
    extra: further client_update arguments (FwdLLM's previous update); () for none.
    guide: the round's ZGR guidance; None for plain directions.
  """
  round_index: int              # numbered from 1
  clients: np.ndarray           # int32 [C] the sampled clients, in the order of the replies
  counts: np.ndarray            # float32 [C] their example counts (the FedAvg weights)
  lr: Any                       # float32 scalar: the round's rate
  extra: tuple = ()             # further client_update arguments (FwdLLM's previous update)
  guide: Optional[Guidance] = None  # the round's ZGR guidance (None: plain directions)

  def to(self, i: int) -> 'Messages':
    """The message the i-th sampled client gets: the round's, with its own id and count only."""
    return self._replace(clients=self.clients[i:i + 1], counts=self.counts[i:i + 1])


class Replies(NamedTuple):
  """What came back from the clients by the deadline, in the messages' client order. A client
  whose reply did not arrive (arrived False) is a dropout: its rows are zeros and weigh 0.

  Attributes:
    uplink: the clients' Uplink, host arrays [C, S, P, ...].
    losses: float32 [C, S], the clients' training losses.
    arrived: bool [C], whether each client's reply arrived.
  """
  uplink: Uplink                # [C, S, P, ...] host arrays
  losses: np.ndarray            # float32 [C, S]
  arrived: np.ndarray           # bool [C]

  @classmethod
  def collect(cls, replies: Sequence[Optional[tuple[Uplink, Any]]], steps: int,
              probes: int) -> 'Replies':
    """The round's replies from one entry per sampled client.

    Args:
      replies: (uplink [S, P, ...], losses [S]) of a client that replied, None for one whose
        reply did not arrive.
      steps, probes: S and P, the shape every reply has.
    Returns:
      Replies with zero rows (and arrived False) where a reply is missing.
    """
    c = len(replies)
    uplink = Uplink(np.zeros((c, steps, probes, 4), np.int32),
                    np.zeros((c, steps, probes), np.float32),
                    np.zeros((c, steps, probes), np.float32))
    losses = np.zeros((c, steps), np.float32)
    arrived = np.array([r is not None for r in replies], bool)
    for i, reply in enumerate(replies):
      if reply is not None:
        for rows, got in zip(uplink + (losses,), tuple(reply[0]) + (reply[1],)):
          rows[i] = np.asarray(got)
    return cls(uplink, losses, arrived)


class RoundOutput(NamedTuple):
  """What a round returns: the edge's new global weights and what it received.

  Attributes:
    trainable: the global trainable weights after the edge's update.
    uplinks: what the clients sent, an Uplink of host arrays [C, S, P, ...].
    losses: float32 [C, S], the clients' training losses.
    received: what the edge used (channel.Received): the uplinks as received, the FedAvg
      weights float32 [C] (0 for a dropout) and what happened on the way.
  """
  trainable: Any                # the global trainable weights after the edge's update
  uplinks: Uplink               # what the clients sent, [C, S, P, ...] (host arrays)
  losses: np.ndarray            # [C, S] the clients' training losses
  received: Received            # what the edge used: uplinks as received, FedAvg weights, counts


class Round:
  """round(trainable, frozen, batches, counts, clients, round_index, lr, *extra, guide=None)
  -> RoundOutput; `trainable` is donated unless donate=False.

  The probe keys are functions of (seed, round, client, step, probe), so the CLI's round
  numbering gives the same bits. A call is
  apply(trainable, m, run_clients(trainable, frozen, m, batches)) for the round's Messages m; a
  transport replaces run_clients.

  Args:
    client_update: one client's update (make_client_update).
    seed: the run's seed; the probe keys derive from it.
    chunk: how many clients the jitted clients call vmaps at a time inside its lax.map.
    mesh: with a mesh the clients are split over its 'clients' axis (C must divide evenly)
      and the edge's result stays replicated; None runs on the default device.
    backend: 'map' (every client in one jitted call) or 'loop' (one jitted call per client,
      for debugging).
    distribution: the directions' distribution; must be the Estimator's (the edge regenerates
      its directions).
    shared: the clients' addresses are identical (DeComFL): the edge combines the scalars per
      (step, probe) before replaying.
    aggregation: the edge's rule for combining the uplinks (mean, clip, trimmed_mean, median).
    channel: the uplinks' transforms on the way (DP, simulated faults).
    donate: donate `trainable` to the edge's jitted update (it is updated in place).
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

  def run_clients(self, trainable: PyTree, frozen: PyTree, messages: Messages,
                  batches: dict) -> Replies:
    """The sampled clients' replies computed in this process (every one arrives).

    Args:
      trainable, frozen: the global model the clients hold.
      messages: the round's Messages.
      batches: {name: [C, S, B, ...]} the sampled clients' local batches.
    Returns:
      Replies, host arrays.
    """
    ids = np.asarray(messages.clients, np.int32)
    args = (batches, jnp.asarray(messages.counts, jnp.float32), jnp.asarray(ids),
            jnp.int32(messages.round_index))
    if self.mesh is not None:
      args = mesh_lib.place_round(self.mesh, *args)
    uplinks, losses = self.local_training(trainable, frozen, args[0], args[2], args[3],
                                          messages.lr, *messages.extra, guide=messages.guide)
    return Replies(jax.tree.map(np.asarray, uplinks), np.asarray(losses), np.ones(len(ids), bool))

  def deliver(self, messages: Messages, replies: Replies) -> Received:
    """What reaches the edge: the replies through the channel (DP, simulated faults, the edge's
    intake); a reply that did not arrive is a dropout."""
    return self.channel(replies.uplink, messages.counts, messages.clients, messages.round_index,
                        missing=~np.asarray(replies.arrived, bool))

  def apply(self, trainable: PyTree, messages: Messages, replies: Replies) -> RoundOutput:
    """The edge's half of the round: the replies that arrived, then its update.

    Args:
      trainable: the global trainable weights (donated unless donate=False).
      messages: what the edge sent for the round.
      replies: what came back (Replies.collect, or run_clients in this process).
    Returns:
      RoundOutput.
    """
    received = self.deliver(messages, replies)
    new = self.edge(trainable, received.uplink, received.client_weights, messages.lr,
                    messages.guide)
    return RoundOutput(new, replies.uplink, replies.losses, received)

  def __call__(self, trainable: PyTree, frozen: PyTree, batches: dict, counts: Any, clients: Any,
               round_index: int, lr: float, *extra: Any,
               guide: Optional[Guidance] = None) -> RoundOutput:
    """One whole round: run_clients in this process, then apply.

    Args:
      trainable: the global trainable weights (donated unless donate=False).
      frozen: the frozen weights.
      batches: {name: [C, S, B, ...]}, the sampled clients' local batches.
      counts: float32 [C], the FedAvg weights (the clients' example counts).
      clients: int32 [C], the sampled client ids.
      round_index: 1-based, as the CLI numbers rounds (round 0 is the starting model's
        evaluation).
      lr: the round's rate.
      *extra: further client_update arguments (e.g. FwdLLM's previous update).
      guide: the round's ZGR guidance (make_guidance), used by every client and by the edge's
        replay; None for plain directions.

    Returns:
      RoundOutput.
    """
    messages = Messages(int(round_index), np.asarray(clients, np.int32),
                        np.asarray(counts, np.float32), lr, extra, guide)
    return self.apply(trainable, messages, self.run_clients(trainable, frozen, messages, batches))


# The factory name the package exports (cj.make_round), as optax names its transformations.
make_round = Round

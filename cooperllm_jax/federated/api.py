"""The algorithm protocol every federated algorithm implements (fedjax's FederatedAlgorithm and
optax's GradientTransformation are the models: a value with pure methods over a typed state,
registered by name).

    from_config(cfg, model, public) -> algorithm   built from the typed run config (classmethod)
    init(params) -> ServerState               the edge's state before round 1
    run_round(state, batches, counts, clients, round_index) -> (state, RoundResult)
    edge_update(state, uplink, client_weights, guide) -> state
                                              replayable ones: the edge's whole update from one
                                              round's received uplinks; the round runs it, and the
                                              ledger's replay (experiments/replay.py) runs nothing
                                              else, so what it does replays bit for bit
    guide(state) -> Guidance | None           the guidance the last round's probes and replay used
    model_params(state) -> params             plain model params (LoRA merged) to evaluate
    client_memory(state, batch_shapes) -> dict  XLA's estimate of one client's local training
    dense_bytes(state) -> int                 bytes of the trainable weights (a full sync)
    attach_clock(clock)                       the run's simulated clock, once it exists
    name: str                                 set by registry.register
    config: type | None                       its config section (registry.register(config=...))
    costs: Costs                              what the simulated clock charges each tier
    sync_bytes: int | None                    a fixed catch-up message, or None: replay the rounds
    replayable: bool                          edge_update over the ledger rebuilds the model;
                                              replay refuses the others in one line
    needs_public: bool                        the cloud's public examples are passed in
    mesh: Mesh | None                         the clients' mesh (round inputs are placed on it)

A `Deployable` algorithm (the scalar protocols and cooperllm) also splits its round at the
transport, so the in-process simulation and a deployment run the same edge:

    prepare(state, clients, counts, round_index) -> (state, Messages)
                                              the edge's (and the cloud's) work before the clients
    run_clients(state, messages, batches) -> Replies   the clients, in this process
    apply(state, messages, replies) -> (state, RoundResult)
                                              the replies that arrived (a missing one: a dropout,
                                              weight 0 in the ledger), then the edge's update

and its run_round is prepare -> run_clients -> apply.

batches is {name: [C, S, B, ...]} (C sampled clients, S local steps), counts float32 [C] (examples
held by each client: the FedAvg weights), clients int32 [C] (their ids) and round_index the round,
numbered from 1 (the run loop evaluates the starting model as round 0).

A method never changes its arguments: a round returns a new state (NamedTuple._replace), and the
state is donated to the edge's jitted update, so a caller keeps a copy of what it needs after the
round (the divergence guard does). A new algorithm is one module that defines a class with this
protocol, decorated with `registry.register('name', config=Section)` (docs/algorithms.md).
"""

import abc
import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Protocol

import jax
import numpy as np

from cooperllm_jax.federated.clients import Uplink
from cooperllm_jax.federated.round import Messages, Replies
from cooperllm_jax.system.codec import LeafCodec
from cooperllm_jax.zoo.guided import Guidance

SCALAR_BYTES = 4
COUNT_BYTES = 4   # a client's example count, sent with its update


class ServerState(NamedTuple):
  """The edge's state of every algorithm (fedjax's ServerState): the fields the run loop, the
  divergence guard, the ledger and the checkpoints read, and the algorithm's own typed state."""
  trainable: Any                # the weights the clients change (d: their count), float32 master
  frozen: Any                   # the rest of the model: never changes, so never donated or saved
  lr: jax.Array                 # float32 scalar: the guard halves it without recompiling
  extra: Any = ()               # the algorithm's own state (NamedTuples, optax states); () if none


@dataclasses.dataclass(frozen=True)
class RoundResult:
  """What a round reports besides the new state: losses, traffic and work per client.

  Attributes:
    losses: [C, S], the mean training loss of each local step.
    uplink_bytes: [C], the bytes each client sent.
    broadcast_bytes: the bytes of what this round adds to the global model, as broadcast.
    forwards: [C], the forward passes each client ran.
    backwards: [C], the backward passes each client ran.
    uplink: the round's ledger as the edge received it, an Uplink [C, S, P, ...]; None for
      dense protocols.
    client_weights: [C], the FedAvg weights the edge used (0: did not arrive); None if unset.
    sent: bool [C], whether each client uploaded (privacy releases); None if unset.
    guidance_bytes: what every sampled client receives for this round (ZGR's V).
    cloud_ran: whether the cloud backpropped this round; None without a cloud tier.
    metrics: algorithm-specific scalars to log.
  """
  losses: np.ndarray            # [C, S] mean training loss of each local step
  uplink_bytes: np.ndarray      # [C] bytes each client sent
  broadcast_bytes: int          # bytes of what this round adds to the global model, as broadcast
  forwards: np.ndarray          # [C] forward passes each client ran
  backwards: np.ndarray         # [C] backward passes each client ran
  uplink: Optional[Uplink] = None  # the round's ledger as the edge received it, [C, S, P, ...]
  client_weights: Optional[np.ndarray] = None  # [C] FedAvg weights the edge used (0: not arrived)
  sent: Optional[np.ndarray] = None  # bool [C]: the client uploaded (privacy releases)
  guidance_bytes: int = 0       # what every sampled client receives for this round (ZGR's V)
  cloud_ran: Optional[bool] = None  # the cloud backpropped this round (None: no cloud tier)
  metrics: dict = dataclasses.field(default_factory=dict)  # algorithm-specific scalars to log


@dataclasses.dataclass(frozen=True)
class GuidanceCosts:
  """The cloud tier's work and downlink (ZGR): what the simulated clock charges for guidance."""
  pool_size: int                # m
  codec: LeafCodec              # V's wire format (an allocating format's f32 baseline)
  cloud_examples: int           # public examples the cloud backprops per refresh
  cloud_adamw: bool             # finetune mode: the cloud takes AdamW steps
  cloud_lag: int
  refresh: int


@dataclasses.dataclass(frozen=True)
class Costs:
  """An algorithm's per-step costs for the simulated clock (system/clock.py)."""
  step_passes: int              # forward passes of one local step (Estimator.forwards_per_step)
  client_backprop: bool = False  # clients backprop and send dense deltas (fedavg_bp)
  guidance: Optional[GuidanceCosts] = None


class Algorithm(Protocol):
  """The protocol of the module docstring (docs/algorithms.md walks through a new one).

  Attributes:
    name: the algorithm's name, set by registry.register.
    config: its config section's dataclass (registry.register(config=...)), or None.
    costs: what the simulated clock charges each tier (Costs).
    sync_bytes: the size of a fixed catch-up message, or None: a client replays the rounds.
    replayable: edge_update over the ledger rebuilds the model.
    needs_public: the cloud's public examples are passed to from_config.
    mesh: the clients' mesh (round inputs are placed on it), or None.
  """
  name: str
  config: ClassVar[Optional[type]]
  costs: Costs
  sync_bytes: Optional[int]
  replayable: bool
  needs_public: bool
  mesh: Any

  @classmethod
  def from_config(cls, cfg: Any, model: Any, public: Optional[dict] = None) -> 'Algorithm': ...
  def init(self, params: Any) -> ServerState: ...
  def run_round(self, state: ServerState, batches: dict, counts: np.ndarray, clients: np.ndarray,
                round_index: int) -> tuple[ServerState, RoundResult]: ...
  def edge_update(self, state: ServerState, uplink: Uplink, client_weights: Any,
                  guide: Optional[Guidance] = None) -> ServerState:
    """Replayable algorithms only (the others' updates are not all in the ledger)."""
  def guide(self, state: ServerState) -> Optional[Guidance]: ...
  def model_params(self, state: ServerState) -> Any: ...
  def client_memory(self, state: ServerState, batch_shapes: dict) -> dict: ...
  def dense_bytes(self, state: ServerState) -> int: ...
  def attach_clock(self, clock: Any) -> None: ...


class Deployable(abc.ABC):
  """Base of algorithms whose round the edge runs as prepare -> the clients -> apply (the module
  docstring), whatever carries the messages; run_round runs the clients in this process.

  A subclass implements prepare(state, clients, counts, round_index) -> (state, Messages),
  run_clients(state, messages, batches) -> Replies and apply(state, messages, replies)
  -> (state, RoundResult); the state is donated to the edge's update in apply.
  """

  @abc.abstractmethod
  def prepare(self, state: ServerState, clients: np.ndarray, counts: np.ndarray,
              round_index: int) -> tuple[ServerState, Messages]:
    """The edge's work before the clients.

    Args:
      state: the edge's state after the last round.
      clients: int32 [C] the sampled clients; counts: float32 [C] their example counts.
      round_index: numbered from 1.
    Returns:
      (state, the round's Messages): the state with what the edge did before sending (cooperllm:
      the cloud's direction and the round's guidance).
    """

  @abc.abstractmethod
  def run_clients(self, state: ServerState, messages: Messages, batches: dict) -> Replies:
    """The sampled clients' replies, computed in this process from their batches
    {name: [C, S, B, ...]}; every reply arrives."""

  @abc.abstractmethod
  def apply(self, state: ServerState, messages: Messages,
            replies: Replies) -> tuple[ServerState, RoundResult]:
    """The edge's work after the clients.

    Args:
      state: prepare's state (donated to the edge's update).
      messages: prepare's Messages.
      replies: what arrived by the deadline (round.Replies.collect for a transport); a missing
        reply is a dropout: weight 0, recorded so in the RoundResult and the ledger.
    Returns:
      (new state, RoundResult), as run_round.
    """

  def run_round(self, state: ServerState, batches: dict, counts: np.ndarray, clients: np.ndarray,
                round_index: int) -> tuple[ServerState, RoundResult]:
    """Algorithm.run_round: prepare, the clients in this process, apply."""
    return self.run_round_through(self.run_clients, state, batches, counts, clients, round_index)

  def run_round_through(self, run_clients: Callable[..., Replies], state: ServerState,
                        batches: dict, counts: np.ndarray, clients: np.ndarray,
                        round_index: int) -> tuple[ServerState, RoundResult]:
    """run_round with the clients behind a transport: prepare, run_clients(state, messages,
    batches) -> Replies (in this process, or a deployment's: cooperllm_jax/deploy), apply."""
    state, messages = self.prepare(state, clients, counts, round_index)
    return self.apply(state, messages, run_clients(state, messages, batches))

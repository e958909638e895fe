"""The algorithm protocol every federated algorithm implements (fedjax's FederatedAlgorithm and
optax's GradientTransformation are the models: a value with pure-ish methods, registered by name).

    init(params) -> state                     the edge's state (a dict pytree: 'trainable' or
                                              'params', 'lr', algorithm-specific entries)
    run_round(state, batches, counts, clients, round_index) -> (state, RoundResult)
    model_params(state) -> params             plain model params (LoRA merged) to evaluate
    trainable(state) -> tree                  the weights the clients change (d, the clock's stages)
    client_memory(state, batch_shapes) -> dict  XLA's estimate of one client's local training
    dense_bytes(state) -> int                 bytes of the trainable weights (a full sync)
    costs: Costs                              what the simulated clock charges each tier
    sync_bytes: int | None                    a fixed catch-up message, or None: replay the rounds
    replayable: bool                          the ledger rebuilds the model (scalar protocols)
    needs_public: bool                        the cloud's public examples are passed in
    mesh: Mesh | None                         the clients' mesh (round inputs are placed on it)
    attach_clock(clock)                       the run's simulated clock, once it exists

batches is {name: [C, S, B, ...]} (C sampled clients, S local steps), counts float32 [C] (examples
held by each client: the FedAvg weights), clients int32 [C] (their ids) and round_index the round,
numbered from 1 (the run loop evaluates the starting model as round 0). state['lr'] (float32)
is the rate the rounds use: the divergence guard halves it without recompiling.

A new algorithm is one module that defines a class with this protocol and a `from_config(cfg,
model, public)` classmethod, decorated with `registry.register('name')`.
"""

import dataclasses
from typing import Any, Optional, Protocol

import numpy as np

from cooperllm_jax.federated.clients import Uplink
from cooperllm_jax.system.codec import LeafCodec

SCALAR_BYTES = 4
COUNT_BYTES = 4   # a client's example count, sent with its update


@dataclasses.dataclass
class RoundResult:
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
  """The protocol of the module docstring (docs/algorithms.md walks through a new one)."""
  name: str
  costs: Costs
  sync_bytes: Optional[int]
  replayable: bool
  needs_public: bool
  mesh: Any

  def init(self, params: Any) -> dict: ...
  def run_round(self, state: dict, batches: dict, counts: np.ndarray, clients: np.ndarray,
                round_index: int) -> tuple[dict, RoundResult]: ...
  def model_params(self, state: dict) -> Any: ...
  def trainable(self, state: dict) -> Any: ...
  def client_memory(self, state: dict, batch_shapes: dict) -> dict: ...
  def dense_bytes(self, state: dict) -> int: ...
  def attach_clock(self, clock: Any) -> None: ...

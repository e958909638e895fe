"""The scalar protocols' common machinery: ZO clients upload (address, scalar) entries, the edge
replays them (federated/round.py). fedmezo, fedkseed, decomfl and fwdllm are small subclasses that
choose the directions' addresses, the client update and what goes over the links; CooperLLM wraps
one (federated/algorithms/cooperllm.py).

A subclass's own state lives in ServerState.extra (`init_extra`), reaches its clients through
`client_extra` and changes at the edge through `after_edge`, which runs inside the edge's jitted
update: the state is donated to that call, and `after_edge` still sees the weights that entered
the round. The ledger's replay runs the same `edge_update`, so whatever `after_edge` does replays
bit for bit.
"""

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax import mesh as mesh_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import clients as clients_lib
from cooperllm_jax.federated.api import (COUNT_BYTES, SCALAR_BYTES, Costs, Deployable,
                                         RoundResult, ServerState)
from cooperllm_jax.federated.channel import Channel, Received
from cooperllm_jax.federated.faults import FaultModel
from cooperllm_jax.federated.privacy import GaussianPrivacy
from cooperllm_jax.federated.round import Messages, Replies, Round
from cooperllm_jax.memory import compiled_memory
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.tree_math import tree_bytes
from cooperllm_jax.zoo import quantized
from cooperllm_jax.zoo.perturb import master
from cooperllm_jax.zoo.spsa import Estimator
from cooperllm_jax.zoo.trainable import Subset


def channel_for(cfg: config_lib.RunConfig) -> Channel:
  """The run's channel: its DP and simulated faults (each None when off)."""
  return Channel(FaultModel.of(cfg.faults, cfg.data.num_clients, cfg.seed),
                 GaussianPrivacy.of(cfg.dp, cfg.seed))


@dataclasses.dataclass
class ScalarProtocol(Deployable):
  """A ZO protocol on the scalar uplink; see the module docstring. Subclasses override the class
  attributes and the small methods below, nothing else."""
  model: Any
  est: Estimator
  subset: Subset
  lr: float
  seed: int
  chunk: int = 1
  backend: str = 'map'
  base_weights: str = 'f32'     # frozen weights on the client: 'f32', 'int8', 'int4'
  base_group: int = 32          # columns per quantization scale
  mesh: Any = None              # clients split over its 'clients' axis (cooperllm_jax/mesh.py)
  aggregation: config_lib.Aggregation = config_lib.Aggregation()
  channel: Channel = Channel()

  name: ClassVar[str] = ''
  config: ClassVar[Optional[type]] = None
  shared_directions: ClassVar[bool] = False   # every client probes the same directions (DeComFL)
  address_bytes: ClassVar[int] = 0            # bytes per probe naming its direction
  replayable: ClassVar[bool] = True           # the ledger holds everything edge_update reads
  needs_public: ClassVar[bool] = False
  sync_bytes: ClassVar[Optional[int]] = None  # None: a client catches up by replaying rounds

  @classmethod
  def options(cls, cfg: config_lib.RunConfig, model) -> dict:
    """The constructor arguments every scalar protocol takes from a run config."""
    mesh = mesh_lib.for_run(cfg.mesh, cfg.clients_per_round)
    if mesh is not None and cfg.client_backend != 'map':
      raise ConfigError("client_backend='loop' runs the clients one by one on one device; it "
                        'takes no mesh (set mesh.clients/data/model to 1)')
    return dict(model=model, est=cfg.zo.estimator, subset=cfg.zo.subset, lr=cfg.learning_rate,
                seed=cfg.seed, chunk=cfg.client_chunk, backend=cfg.client_backend,
                base_weights=cfg.zo.base_weights, base_group=cfg.zo.base_group, mesh=mesh,
                aggregation=cfg.aggregation, channel=channel_for(cfg))

  @classmethod
  def from_config(cls, cfg: config_lib.RunConfig, model, public=None):
    del public
    return cls(**cls.options(cfg, model))

  def __post_init__(self):
    self.client_update = self.make_client_update(make_loss(self.model))
    # Only what the clients read enters their jit (the cloud's state may live on other devices).
    self.round = Round(self.client_update, seed=self.seed, chunk=self.chunk, mesh=self.mesh,
                       backend=self.backend, distribution=self.est.distribution,
                       shared=self.shared_directions, aggregation=self.aggregation,
                       channel=self.channel)
    self._edge = jax.jit(self._edge_step, donate_argnums=0)

  # -- what a subclass chooses -----------------------------------------------------------------
  def addresses(self) -> clients_lib.AddressFn:
    return clients_lib.own_addresses

  def make_client_update(self, loss_fn):
    return clients_lib.make_client_update(loss_fn, self.est, self.subset, self.addresses())

  def init_extra(self, trainable) -> Any:
    """The protocol's own state (ServerState.extra) before round 1, e.g. FwdLLM's previous
    update; () for none."""
    del trainable
    return ()

  def client_extra(self, state: ServerState) -> tuple:
    """Further positional client_update arguments read from the state."""
    del state
    return ()

  def after_edge(self, old: ServerState, trainable) -> ServerState:
    """The state after the edge's replay turned old.trainable into `trainable`. Traced inside the
    edge's jitted update (old is donated to it but still readable here); the default keeps
    everything else."""
    return old._replace(trainable=trainable)

  def uplink_bytes(self, used: np.ndarray, steps: int) -> np.ndarray:
    """[C] bytes each client sends for `used` probes over `steps` local steps."""
    del steps
    return used * (SCALAR_BYTES + self.address_bytes) + COUNT_BYTES

  def broadcast_bytes(self, up: np.ndarray, arrived: np.ndarray, steps: int) -> int:
    """What the edge broadcasts for the round: every arrived client's entries and its id."""
    del steps
    return int(up[arrived].sum()) + int(arrived.sum()) * 4

  # -- state -------------------------------------------------------------------------------------
  def init(self, params) -> ServerState:
    trainable, frozen = self.subset.split(params, jax.random.key(self.seed))
    # Our own copy: rounds donate (update in place) the trainable weights, never the caller's; kept
    # as a float32 master (zoo.perturb.master) so the edge's replay loses no sub-ulp update.
    # Clients keep frozen weights quantized if asked: zoo/quantized.py.
    return self.on_mesh(ServerState(
        jax.tree.map(jnp.copy, master(trainable)),
        quantized.quantize_frozen(frozen, self.base_weights, self.base_group),
        jnp.float32(self.lr), self.init_extra(trainable)))

  def on_mesh(self, tree):
    """tree as global arrays on the run's mesh (replicated, or as already placed there), so every
    process holds the same state and orbax can save it; unchanged without a mesh."""
    return tree if self.mesh is None else mesh_lib.replicate(tree, self.mesh)

  def model_params(self, state: ServerState):
    return self.subset.materialize(quantized.dequantize_tree(state.frozen), state.trainable)

  def dense_bytes(self, state: ServerState) -> int:
    return tree_bytes(state.trainable)

  def guide(self, state: ServerState) -> None:
    """The scalar protocols probe unguided (a tier around one guides it: cooperllm)."""
    del state

  @property
  def costs(self) -> Costs:
    return Costs(step_passes=self.est.forwards_per_step)

  def attach_clock(self, clock) -> None:
    del clock

  # -- one round ---------------------------------------------------------------------------------
  def _edge_step(self, server: ServerState, uplinks, client_weights, guide):
    return self.after_edge(server, self.round.edge_fn(server.trainable, uplinks, client_weights,
                                                      server.lr, guide))

  def edge_update(self, state: ServerState, uplinks: clients_lib.Uplink, client_weights,
                  guide=None) -> ServerState:
    """The edge's update at state.lr from one round's received uplinks (edge replay, then
    after_edge), in one jitted call that donates the state (its frozen weights aside)."""
    new = self._edge(state._replace(frozen=None), uplinks, client_weights, guide)
    return new._replace(frozen=state.frozen)

  def prepare(self, state: ServerState, clients, counts, round_index: int,
              guide=None) -> tuple[ServerState, Messages]:
    """api.Deployable.prepare; guide: the round's guidance, from a tier around the protocol (the
    protocol's own state is unchanged: its clients read it as it is)."""
    return state, Messages(int(round_index), np.asarray(clients, np.int32),
                           np.asarray(counts, np.float32), np.float32(state.lr),
                           self.client_extra(state), guide)

  def run_clients(self, state: ServerState, messages: Messages, batches) -> Replies:
    return self.round.run_clients(state.trainable, state.frozen, messages, batches)

  def apply(self, state: ServerState, messages: Messages,
            replies: Replies) -> tuple[ServerState, RoundResult]:
    received = self.round.deliver(messages, replies)
    new = self.edge_update(state, received.uplink, received.client_weights, messages.guide)
    return new, self.account(replies.uplink, replies.losses, received)

  def account(self, uplinks: clients_lib.Uplink, losses, received: Received) -> RoundResult:
    """Bytes and passes of the clients that ran and sent (a dropped client: none)."""
    used = (uplinks.weights > 0).sum(axis=(1, 2)) * received.sent      # [C] probes run and sent
    steps = uplinks.scalars.shape[1]
    up = self.uplink_bytes(used, steps) * received.sent
    forwards = self.est.forwards(used, steps) * received.sent
    arrived = received.client_weights > 0
    return RoundResult(losses=losses, uplink_bytes=up.astype(np.int64),
                       broadcast_bytes=self.broadcast_bytes(up, arrived, steps),
                       forwards=forwards.astype(np.int64),
                       backwards=np.zeros_like(forwards, np.int64), uplink=received.uplink,
                       client_weights=received.client_weights, sent=received.sent,
                       metrics=dict(received.metrics))

  def client_memory(self, state: ServerState, batch_shapes, guide=None) -> dict:
    """XLA's memory estimate of one client's jitted local training (S steps), abstract shapes;
    guide: the guidance its probes take, if any."""
    extra = self.client_extra(state) + (() if guide is None else (guide,))
    return compiled_memory(self.client_update, state.trainable, state.frozen, batch_shapes,
                           self.seed, 1, 0, self.lr, *extra, donate_argnums=0)


@dataclasses.dataclass
class OnScalarProtocol:
  """Base of algorithms that run a scalar protocol `zo` and add a tier around its rounds
  (cooperllm's cloud guidance, warm_start's cloud-only rounds): the weights, their bytes, the
  client's memory, the mesh and the edge's replay are zo's. The state's extra is the tier's own
  NamedTuple, whose field `zo` holds zo's extra: `zo_state` is zo's view of the state, `with_zo`
  puts zo's new state back."""
  zo: ScalarProtocol

  name: ClassVar[str] = ''
  config: ClassVar[Optional[type]] = None
  needs_public: ClassVar[bool] = True
  sync_bytes: ClassVar[Optional[int]] = None

  @property
  def mesh(self):
    return self.zo.mesh

  def attach_clock(self, clock) -> None:
    del clock

  @staticmethod
  def zo_state(state: ServerState) -> ServerState:
    return state._replace(extra=state.extra.zo)

  @staticmethod
  def with_zo(state: ServerState, zo_state: ServerState) -> ServerState:
    return zo_state._replace(extra=state.extra._replace(zo=zo_state.extra))

  def edge_update(self, state, uplinks, client_weights, guide=None):
    return self.with_zo(state, self.zo.edge_update(self.zo_state(state), uplinks, client_weights,
                                                   guide))

  def guide(self, state):
    return self.zo.guide(self.zo_state(state))

  def model_params(self, state):
    return self.zo.model_params(self.zo_state(state))

  def dense_bytes(self, state) -> int:
    return self.zo.dense_bytes(self.zo_state(state))

  def client_memory(self, state, batch_shapes) -> dict:
    return self.zo.client_memory(self.zo_state(state), batch_shapes)

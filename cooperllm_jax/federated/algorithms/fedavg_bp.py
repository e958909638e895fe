"""fedavg_bp: clients backprop with optax, the edge averages their deltas (the first-order bound).

Pure, jittable functions: `make_client_update` trains one client with lax.scan over its local
steps; `make_round` maps it over the round's clients (lax.map with batch_size: vmap over `chunk`
clients at a time) and applies the sample-weighted mean delta. `FedAvgBP` is the algorithm: the
channel's arrivals (dropouts, stragglers) set the FedAvg weights; dense uploads are not modelled
as corruptible, so aggregation rules, DP and the Byzantine/non-finite faults do not apply.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cooperllm_jax import config as config_lib
from cooperllm_jax import mesh as mesh_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated.algorithms.scalar import channel_for
from cooperllm_jax.federated.api import COUNT_BYTES, Costs, RoundResult, ServerState
from cooperllm_jax.federated.channel import Channel
from cooperllm_jax.federated.edge import fedavg_weights
from cooperllm_jax.federated.registry import register
from cooperllm_jax.memory import compiled_memory
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.tree_math import tree_bytes
from cooperllm_jax.zoo.spsa import loss_at
from cooperllm_jax.zoo.trainable import Subset


def make_client_update(model, optimizer: optax.GradientTransformation,
                       subset: Subset = Subset()) -> Callable:
  """client_update(trainable, frozen, batches) -> (delta, losses): backprop on the subset's
  trainable leaves (Subset.split; 'full': all of them, frozen = {}), the frozen ones held fixed.

  batches: {name: [steps, batch, ...]}; delta has trainable's structure; losses: float32 [steps].
  The optimizer state starts fresh every round, as in FedAvg.
  """
  loss_fn = make_loss(model)

  def loss(trainable, frozen, batch):
    return loss_at(loss_fn, trainable, frozen, batch, None, 0.0, subset=subset)

  def client_update(trainable, frozen, batches):
    def step(carry, batch):
      p, state = carry
      value, grads = jax.value_and_grad(loss)(p, frozen, batch)
      updates, state = optimizer.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), value

    (trained, _), losses = jax.lax.scan(step, (trainable, optimizer.init(trainable)), batches)
    return jax.tree.map(jnp.subtract, trained, trainable), losses

  return client_update


def make_round(client_update: Callable, chunk: int = 1) -> Callable:
  """round(trainable, frozen, batches, counts) -> (new trainable, losses [C, steps]), jitted.

  batches: {name: [C, steps, batch, ...]}; counts: float32 [C] example counts (FedAvg weights).
  """

  @jax.jit
  def round_fn(trainable, frozen, batches, counts):
    deltas, losses = jax.lax.map(lambda b: client_update(trainable, frozen, b), batches,
                                 batch_size=chunk)
    weights = fedavg_weights(counts)
    mean = jax.tree.map(lambda d: jnp.tensordot(weights, d.astype(jnp.float32), axes=1), deltas)
    return jax.tree.map(lambda p, d: (p + d).astype(p.dtype), trainable, mean), losses

  return round_fn


@register('fedavg_bp')
@dataclasses.dataclass
class FedAvgBP:
  """Dense deltas of the run's trainable subset (zo.trainable: the same weights the ZO clients
  train) up and down; the divergence guard's rate changes recompile the round."""
  model: Any
  lr: float
  subset: Subset = Subset()
  seed: int = 0
  weight_decay: float = 0.0
  chunk: int = 1
  channel: Channel = Channel()

  name: ClassVar[str] = ''
  config: ClassVar[None] = None
  mesh: ClassVar[None] = None          # one device
  replayable: ClassVar[bool] = False   # the ledger does not keep dense deltas
  needs_public: ClassVar[bool] = False
  sync_bytes: ClassVar[Optional[int]] = None

  @classmethod
  def from_config(cls, cfg: config_lib.RunConfig, model, public=None):
    del public
    if mesh_lib.for_run(cfg.mesh, cfg.clients_per_round) is not None:
      raise ConfigError('fedavg_bp runs on one device: it takes no mesh (set mesh.* to 1)')
    if cfg.aggregation.rule != 'mean' or cfg.dp.active or cfg.faults.corrupts:
      raise ConfigError('fedavg_bp uploads dense deltas: aggregation, dp and the Byzantine/'
                        'nonfinite faults apply to the scalar protocols only')
    return cls(model, cfg.learning_rate, cfg.zo.subset, cfg.seed, cfg.weight_decay,
               cfg.client_chunk, channel_for(cfg))

  def __post_init__(self):
    self._client_update = self._make_client_update(self.lr)
    self._rounds = {}   # learning rate -> jitted round

  def _make_client_update(self, lr):
    return make_client_update(self.model, optax.adamw(lr, weight_decay=self.weight_decay),
                              self.subset)

  def init(self, params) -> ServerState:
    trainable, frozen = self.subset.split(params, jax.random.key(self.seed))
    return ServerState(trainable, frozen, jnp.float32(self.lr))

  def model_params(self, state: ServerState):
    return self.subset.materialize(state.frozen, state.trainable)

  def dense_bytes(self, state: ServerState) -> int:
    return tree_bytes(state.trainable)

  def guide(self, state: ServerState) -> None:
    del state

  @property
  def costs(self) -> Costs:
    return Costs(step_passes=1, client_backprop=True)

  def attach_clock(self, clock) -> None:
    del clock

  def client_memory(self, state, batch_shapes) -> dict:
    """XLA's memory estimate of one client's jitted local training (S steps), abstract shapes."""
    return compiled_memory(self._client_update, state.trainable, state.frozen, batch_shapes,
                           donate_argnums=())

  def run_round(self, state, batches, counts, clients, round_index):
    received = self.channel(None, counts, clients, round_index)
    lr = float(state.lr)   # optax bakes the rate into the compiled round
    if lr not in self._rounds:
      self._rounds[lr] = make_round(self._make_client_update(lr), chunk=self.chunk)
    trainable, losses = self._rounds[lr](state.trainable, state.frozen, batches,
                                         jnp.asarray(received.client_weights))
    losses = np.asarray(losses)
    c, s = losses.shape
    dense = self.dense_bytes(state)
    steps = np.full(c, s, np.int64) * received.sent
    return state._replace(trainable=trainable), RoundResult(
        losses=losses, uplink_bytes=(dense + COUNT_BYTES) * received.sent.astype(np.int64),
        broadcast_bytes=dense, forwards=steps, backwards=steps,
        client_weights=received.client_weights, sent=received.sent, metrics=received.metrics)

"""cloud_only: the cloud alone, the control every ZGR result must beat. AdamW (the run's
learning_rate and weight_decay) on the cloud's public set with the run's trainable subset, one
step per public batch: cloud.batches steps of cloud.batch_size examples a round, the backprop
cooperllm's cloud spends per refresh. No client takes part; the model the edge holds is the
cloud's."""

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.cloud import bp as cloud_bp
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.api import Costs, GuidanceCosts, RoundResult, ServerState
from cooperllm_jax.federated.registry import register
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.tree_math import tree_bytes
from cooperllm_jax.zoo.trainable import Subset


@dataclasses.dataclass
class PublicTrainer:
  """AdamW on the public set for `cloud.batches` steps a round (the cloud's BP step in finetune
  mode, training a model of its own); shared by cloud_only and warm_start."""
  model: Any
  subset: Subset
  cloud: config_lib.Cloud
  public: dict
  seed: int
  learning_rate: float
  weight_decay: float = 0.0

  def __post_init__(self):
    if self.public is None or not len(self.public.get('labels', ())):
      raise ConfigError('the cloud needs public examples (public_fraction > 0 or '
                        'cloud.public_dataset)')
    self.step = cloud_bp.make_cloud_step(
        make_loss(self.model), self.subset,
        cloud_bp.CloudConfig('finetune', self.learning_rate, self.weight_decay))

  def init(self, trainable):
    return self.step.init(trainable)

  def run(self, opt_state, trainable, frozen, round_index):
    """(opt_state, trainable) after this round's steps (both donated)."""
    batches = client_data.public_batches(self.public, self.cloud.batches, self.cloud.batch_size,
                                         self.seed, round_index)
    return self.step.train(opt_state, trainable, frozen, batches)

  @property
  def costs(self) -> GuidanceCosts:
    """The cloud's compute for the clock (in the rounds whose result says it ran); no guidance
    goes down (pool_size 0)."""
    return GuidanceCosts(pool_size=0, codec=None,
                         cloud_examples=self.cloud.batches * self.cloud.batch_size,
                         cloud_adamw=True, cloud_lag=0, refresh=1)


def cloud_round_result(num_clients: int, steps: int) -> RoundResult:
  """A round in which only the cloud worked: the sampled clients ran, sent and got nothing."""
  zeros = np.zeros(num_clients, np.int64)
  return RoundResult(losses=np.zeros((num_clients, steps), np.float32), uplink_bytes=zeros,
                     broadcast_bytes=0, forwards=zeros, backwards=zeros,
                     client_weights=np.zeros(num_clients, np.float32),
                     sent=np.zeros(num_clients, bool), cloud_ran=True)


@register('cloud_only')
@dataclasses.dataclass
class CloudOnly:
  trainer: PublicTrainer
  local_steps: int = 1

  name: ClassVar[str] = ''
  config: ClassVar[None] = None
  mesh: ClassVar[None] = None
  replayable: ClassVar[bool] = False   # the cloud's dense updates are not in the ledger
  needs_public: ClassVar[bool] = True
  sync_bytes: ClassVar[Optional[int]] = None

  @classmethod
  def from_config(cls, cfg: config_lib.RunConfig, model, public=None):
    return cls(PublicTrainer(model, cfg.zo.subset, cfg.cloud, public, cfg.seed, cfg.learning_rate,
                             cfg.weight_decay), cfg.local_steps)

  @property
  def costs(self) -> Costs:
    return Costs(step_passes=0, guidance=self.trainer.costs)

  def attach_clock(self, clock) -> None:
    del clock

  def init(self, params) -> ServerState:
    """The state's extra is the cloud's AdamW state."""
    subset = self.trainer.subset
    trainable, frozen = subset.split(params, jax.random.key(self.trainer.seed))
    trainable = jax.tree.map(jnp.copy, trainable)
    return ServerState(trainable, frozen, jnp.float32(self.trainer.learning_rate),
                       self.trainer.init(trainable))

  def model_params(self, state: ServerState):
    return self.trainer.subset.materialize(state.frozen, state.trainable)

  def dense_bytes(self, state: ServerState) -> int:
    return tree_bytes(state.trainable)

  def guide(self, state: ServerState) -> None:
    del state

  def client_memory(self, state, batch_shapes) -> dict:
    """No client computes anything."""
    del state, batch_shapes
    return {'peak_bytes': 0}

  def run_round(self, state, batches, counts, clients, round_index):
    del batches, counts
    cloud, trainable = self.trainer.run(state.extra, state.trainable, state.frozen, round_index)
    return (state._replace(trainable=trainable, extra=cloud),
            cloud_round_result(len(clients), self.local_steps))

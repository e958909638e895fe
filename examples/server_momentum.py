"""Server momentum on FedMeZO: an algorithm written outside the package (docs/algorithms.md).

The edge keeps a velocity, v <- momentum v + (FedAvg update of the round), and moves the model by v
instead of by the round's update. Run it, and replay its ledger, with

  python -m experiments.train --workdir=/tmp/momentum \\
      --config=experiments/configs/demo.py:examples.server_momentum:fedmezo_momentum \\
      --config.fedmezo_momentum.momentum=0.5
  python -m experiments.replay --workdir=/tmp/momentum
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax import config as config_lib
from cooperllm_jax.federated.algorithms.fedmezo import FedMeZO
from cooperllm_jax.federated.api import ServerState
from cooperllm_jax.federated.registry import register


@dataclasses.dataclass(frozen=True)
class MomentumConfig:
  """The config section `fedmezo_momentum`."""
  momentum: float = config_lib.field(0.9, 'the share of the last step the edge keeps')

  def __post_init__(self):
    config_lib.check(0 <= self.momentum < 1,
                     f'fedmezo_momentum.momentum must be in [0, 1), got {self.momentum}')


class Velocity(NamedTuple):
  velocity: Any                 # the trainable tree's structure, float32


@register('fedmezo_momentum', config=MomentumConfig)
@dataclasses.dataclass
class FedMeZOMomentum(FedMeZO):
  momentum: float = 0.9

  @classmethod
  def from_config(cls, cfg, model, public=None):
    del public
    return cls(**cls.options(cfg, model), momentum=cfg.fedmezo_momentum.momentum)

  def init_extra(self, trainable) -> Velocity:
    return Velocity(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable))

  def after_edge(self, old: ServerState, trainable) -> ServerState:
    velocity = jax.tree.map(lambda v, new, t: self.momentum * v + (new - t),
                            old.extra.velocity, trainable, old.trainable)
    return old._replace(trainable=jax.tree.map(jnp.add, old.trainable, velocity),
                        extra=Velocity(velocity))

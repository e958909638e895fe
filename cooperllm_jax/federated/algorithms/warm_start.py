"""warm_start: the control a reviewer runs next to cloud_only. The cloud trains alone on its public
set for the first warm.rounds rounds (cloud_only at cloud.learning_rate), then the ZO protocol
warm.then (FedMeZO by default, at learning_rate) fine-tunes that model on the clients for the
remaining rounds. Whatever CooperLLM gains must exceed what this sequence gets. With
warm.cloud_rounds = rounds the cloud phase spends cloud_only's whole compute (its rounds' batches,
in order), so the ZO phase starts from cloud_only's final model. Its config section is `warm`."""

import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

from cooperllm_jax import config as config_lib
from cooperllm_jax.config import field
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import registry
from cooperllm_jax.federated.algorithms.cloud_only import PublicTrainer, cloud_round_result
from cooperllm_jax.federated.algorithms.scalar import OnScalarProtocol, ScalarProtocol
from cooperllm_jax.federated.api import Costs, ServerState
from cooperllm_jax.zoo.quantized import dequantize_tree


@dataclasses.dataclass(frozen=True)
class Warm:
  """The cloud trains alone (cloud_only, at cloud.learning_rate) for the first `rounds` rounds,
  then the scalar protocol `then` (at learning_rate) for the rest. `cloud_rounds`: how many of
  cloud_only's rounds of compute the cloud phase spends, spread evenly over its rounds (0: one a
  round); the run's rounds give it cloud_only's whole model."""
  rounds: int = field(10, 'rounds the cloud trains alone (cloud_only) before warm.then')
  then: str = field('fedmezo', 'the zeroth-order scalar protocol of the rounds after them')
  cloud_rounds: int = field(0, "cloud_only rounds of compute the warm rounds spend (0: one a "
                            'round)')

  def __post_init__(self):
    config_lib.check(isinstance(self.rounds, int) and self.rounds >= 0,
                     f'warm.rounds must be >= 0 (an integer), got {self.rounds!r}')
    whole = self.cloud_rounds == 0 or (self.rounds > 0 and self.cloud_rounds % self.rounds == 0)
    config_lib.check(isinstance(self.cloud_rounds, int) and self.cloud_rounds >= 0 and whole,
                     f'warm.cloud_rounds must be 0 or a multiple of warm.rounds '
                     f'({self.rounds!r}), got {self.cloud_rounds!r}')

  @property
  def cloud_rounds_per_round(self) -> int:
    """cloud_only rounds of AdamW steps in each warm round."""
    return self.cloud_rounds // self.rounds if self.cloud_rounds else 1


class WarmState(NamedTuple):
  """warm_start's own state (ServerState.extra)."""
  cloud: Any                    # the cloud's AdamW state
  zo: Any                       # warm.then's own state (OnScalarProtocol)


@registry.register('warm_start', config=Warm, section='warm')
@dataclasses.dataclass
class WarmStart(OnScalarProtocol):
  trainer: Optional[PublicTrainer] = None
  warm_rounds: int = 0
  cloud_rounds_per_round: int = 1   # cloud_only rounds of AdamW steps in each warm round
  local_steps: int = 1

  replayable: ClassVar[bool] = False   # the warm rounds' dense updates are not in the ledger

  @classmethod
  def from_config(cls, cfg: config_lib.RunConfig, model, public=None):
    then = registry.lookup(cfg.warm.then)
    if not issubclass(then, ScalarProtocol):
      raise ConfigError(f'warm.then={cfg.warm.then!r} must be a zeroth-order scalar protocol '
                        '(fedmezo, fedkseed, decomfl, fwdllm)')
    trainer = PublicTrainer(model, cfg.zo.subset, cfg.cloud, public, cfg.seed,
                            cfg.cloud.learning_rate, cfg.cloud.weight_decay)
    return cls(then.from_config(cfg, model, public), trainer, cfg.warm.rounds,
               cfg.warm.cloud_rounds_per_round, cfg.local_steps)

  @property
  def costs(self) -> Costs:
    guidance = self.trainer.costs
    return dataclasses.replace(self.zo.costs, guidance=dataclasses.replace(
        guidance, cloud_examples=guidance.cloud_examples * self.cloud_rounds_per_round))

  def init(self, params) -> ServerState:
    inner = self.zo.init(params)
    return inner._replace(extra=WarmState(self.trainer.init(inner.trainable), inner.extra))

  def run_round(self, state, batches, counts, clients, round_index):
    if round_index > self.warm_rounds:
      inner, result = self.zo.run_round(self.zo_state(state), batches, counts, clients,
                                        round_index)
      return self.with_zo(state, inner), result
    cloud, trainable, frozen = state.extra.cloud, state.trainable, dequantize_tree(state.frozen)
    k = self.cloud_rounds_per_round
    for cloud_round in range((round_index - 1) * k + 1, round_index * k + 1):
      cloud, trainable = self.trainer.run(cloud, trainable, frozen, cloud_round)
    return (self.zo.on_mesh(state._replace(trainable=trainable,
                                           extra=state.extra._replace(cloud=cloud))),
            cloud_round_result(len(clients), self.local_steps))

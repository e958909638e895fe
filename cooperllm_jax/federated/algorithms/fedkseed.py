"""fedkseed: K candidate seeds fixed for the run; one (seed index, scalar) per probe. The model is
init + sum_k a_k z_k, so a client syncs from the K accumulators (16 KB at K = 4096) whatever it
missed. Its config section is `fedkseed` (FedKSeedConfig)."""

import dataclasses
import math
from typing import ClassVar

import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.config import field
from cooperllm_jax.federated import clients as clients_lib
from cooperllm_jax.federated.algorithms.scalar import ScalarProtocol
from cooperllm_jax.federated.api import SCALAR_BYTES
from cooperllm_jax.federated.registry import register


@dataclasses.dataclass(frozen=True)
class FedKSeedConfig:
  candidates: int = field(4096, 'K: the seeds fixed for the run')

  RENAMED: ClassVar[dict] = {'zo.kseed_candidates': 'candidates'}

  def __post_init__(self):
    config_lib.positive('fedkseed.', self, 'candidates')


@register('fedkseed', config=FedKSeedConfig)
@dataclasses.dataclass
class FedKSeed(ScalarProtocol):
  kseed_candidates: int = 4096

  @classmethod
  def from_config(cls, cfg, model, public=None):
    del public
    return cls(**cls.options(cfg, model), kseed_candidates=cfg.fedkseed.candidates)

  def addresses(self):
    return clients_lib.candidate_addresses(self.kseed_candidates)

  @property
  def address_bytes(self) -> int:   # the candidate's index
    return math.ceil(math.log2(self.kseed_candidates) / 8)

  @property
  def sync_bytes(self) -> int:
    return self.kseed_candidates * SCALAR_BYTES

  def broadcast_bytes(self, up: np.ndarray, arrived: np.ndarray, steps: int) -> int:
    return self.kseed_candidates * SCALAR_BYTES   # the K accumulators

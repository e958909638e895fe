"""decomfl: server-issued directions shared by all clients, scalars both ways. The edge combines
the clients' scalars per (step, probe) and broadcasts S x P scalars; a client that missed rounds
catches up by replaying the broadcast scalars of those rounds."""

import numpy as np

from cooperllm_jax.federated import clients as clients_lib
from cooperllm_jax.federated.algorithms.scalar import ScalarProtocol
from cooperllm_jax.federated.api import SCALAR_BYTES
from cooperllm_jax.federated.registry import register


@register('decomfl')
class DeComFL(ScalarProtocol):
  shared_directions = True

  def addresses(self):
    return clients_lib.shared_addresses

  def broadcast_bytes(self, up: np.ndarray, arrived: np.ndarray, steps: int) -> int:
    return steps * self.est.probes * SCALAR_BYTES

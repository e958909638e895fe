"""cooperllm_jax: cloud-edge-end federated fine-tuning of LLMs with zeroth-order clients, in JAX.

The pure, jittable pieces a user imports into their own loop:

  Estimator, Subset, make_zo_step      one client ZO-SGD step on (trainable, frozen) params
  make_client_update                   S local ZO steps under lax.scan -> (trainable, Uplink, losses)
  make_round                           the round path the CLI runs: clients (one jitted call) ->
                                       channel (DP, faults) -> edge (aggregation, ledger replay)
  replay, address_key                  rebuild any update from (address, scalar) pairs
  make_algorithm, ALGORITHMS           the registered algorithms (fedmezo, fedkseed, decomfl,
                                       fwdllm, fedavg_bp, cooperllm) behind one protocol
                                       (federated/api.py); register your own with
                                       federated.registry.register
  parse                                a ConfigDict as typed, validated sections (config.py)
"""

from cooperllm_jax.config import parse
from cooperllm_jax.federated.algorithms import ALGORITHMS, make_algorithm
from cooperllm_jax.federated.clients import Uplink, make_client_update
from cooperllm_jax.federated.round import make_round
from cooperllm_jax.models import load_pretrained
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo import (Estimator, Subset, address_key, address_keys, coefficients,
                               make_zo_step, replay)

__all__ = ['ALGORITHMS', 'make_algorithm', 'Uplink', 'make_client_update', 'make_round',
           'load_pretrained', 'make_loss', 'parse', 'Estimator', 'Subset', 'address_key',
           'address_keys', 'coefficients', 'make_zo_step', 'replay']

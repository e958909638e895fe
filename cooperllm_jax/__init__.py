"""cooperllm_jax: cloud-edge-end federated fine-tuning of LLMs with zeroth-order clients, in JAX.

The pure, jittable pieces a user imports into their own loop:

  Estimator, Subset, make_zo_step      one client ZO-SGD step on (trainable, frozen) params
  make_client_update                   S local ZO steps under lax.scan -> (trainable, Uplink, losses)
  make_round                           many clients in one jitted call + the edge's ledger replay
  replay, address_key                  rebuild any update from (address, scalar) pairs
  make_algorithm                       the registered algorithms (fedmezo, fedkseed, decomfl, fwdllm,
                                       fedavg_bp) behind one interface
"""

from cooperllm_jax.federated.algorithms import ALGORITHMS, make_algorithm
from cooperllm_jax.federated.zo import Uplink, make_client_update, make_round
from cooperllm_jax.models import load_pretrained
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo import (Estimator, Subset, address_key, address_keys, coefficients,
                               make_zo_step, replay)

__all__ = ['ALGORITHMS', 'make_algorithm', 'Uplink', 'make_client_update', 'make_round',
           'load_pretrained', 'make_loss', 'Estimator', 'Subset', 'address_key', 'address_keys',
           'coefficients', 'make_zo_step', 'replay']

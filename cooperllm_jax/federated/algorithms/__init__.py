"""The federated algorithms, one module each; importing this package registers them all.

  fedmezo    ZO local steps (MeZO), uplink scalars, edge replays every client's ledger.
  fedkseed   K candidate seeds fixed for the run; one (seed index, scalar) per step.
  decomfl    server-issued directions shared by all clients; scalars both ways.
  fwdllm     directions chosen by cosine similarity to the previous global update, extra probes
             while the estimate is noisy.
  fedavg_bp  clients backprop with optax; FedAvg of dense deltas (the first-order upper bound).
  cooperllm  FedMeZO's protocol with cloud-guided perturbations (ZGR).
  cloud_only the cloud alone: AdamW on its public set (the control for cooperllm).
  warm_start cloud_only for warm.rounds rounds, then a ZO protocol on the clients.

Each is a class with the federated.api.Algorithm protocol, registered by name
(federated/registry.py); `make_algorithm(config, model, public)` builds one.
"""

from cooperllm_jax.federated.algorithms import (cloud_only, cooperllm, decomfl, fedavg_bp, fedkseed,
                                                fedmezo, fwdllm, warm_start)
from cooperllm_jax.federated.registry import make_algorithm, names

ALGORITHMS = names()

__all__ = ['ALGORITHMS', 'make_algorithm', 'cloud_only', 'cooperllm', 'decomfl', 'fedavg_bp',
           'fedkseed', 'fedmezo', 'fwdllm', 'warm_start']

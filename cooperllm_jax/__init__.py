"""cooperllm_jax: cloud-edge-end federated fine-tuning of LLMs with zeroth-order clients, in JAX.

What a user imports to write their own loop (examples/custom_loop.py uses every group):

  data        load_dataset, TextDataset, make_partition, Partition, tokenize_texts
              (or Pretrained.tokenize), sample_clients, round_batches, public_set, public_batches
  model       load_pretrained, Pretrained, make_loss
  clients     Estimator, Subset, make_zo_step, make_client_update, Uplink
  round       make_round (Round): clients in one jitted call -> channel (DP, faults) -> the edge's
              jitted replay; RoundOutput. Rounds are numbered from 1 (round 0 is the starting
              model): keys, client samples and batches are functions of (seed, round), so the
              CLI's numbering reproduces its rounds bit for bit. Split at the transport:
              Messages (what the edge sends), Round.run_clients or a deployment's transport
              (Replies.collect: a missing reply is a dropout), Round.apply (the edge).
  ledger      replay, coefficients, address_key, address_keys: rebuild any update from (address,
              scalar) pairs
  cloud (ZGR) make_cloud_step (CloudStep, CloudConfig): BP on public batches -> a direction;
              empty_pool, push, orthonormalize (Pool): the last m directions as an orthonormal
              basis; make_guidance, step_ratio (Guidance): what clients and the edge take as
              `guide=`
  evaluation  evaluate, majority_rate
  algorithms  make_algorithm, ALGORITHMS, register, Algorithm, RoundResult: the registered
              algorithms behind one protocol (docs/algorithms.md); Deployable: the ones whose
              round splits at the transport (prepare, run_clients, apply)
  runs        parse (the typed config), train_and_evaluate (what `cooperllm-train` runs)
"""

from cooperllm_jax.cloud.bp import CloudConfig, CloudStep, make_cloud_step
from cooperllm_jax.cloud.pool import Pool, empty_pool, orthonormalize, push
from cooperllm_jax.config import parse
from cooperllm_jax.data import (Partition, TextDataset, load_dataset, make_partition,
                                tokenize_texts)
from cooperllm_jax.evaluation import evaluate, majority_rate
from cooperllm_jax.federated.algorithms import ALGORITHMS, make_algorithm
from cooperllm_jax.federated.api import Algorithm, Deployable, RoundResult
from cooperllm_jax.federated.client_data import (public_batches, public_set, round_batches,
                                                 sample_clients)
from cooperllm_jax.federated.clients import Uplink, make_client_update
from cooperllm_jax.federated.registry import register
from cooperllm_jax.federated.round import Messages, Replies, Round, RoundOutput, make_round
from cooperllm_jax.models import Pretrained, load_pretrained
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.run import train_and_evaluate
from cooperllm_jax.zoo import (Estimator, Subset, address_key, address_keys, coefficients,
                               make_zo_step, replay)
from cooperllm_jax.zoo.guided import Guidance, make_guidance, step_ratio

__all__ = [
    # data
    'load_dataset', 'TextDataset', 'make_partition', 'Partition', 'tokenize_texts',
    'sample_clients', 'round_batches', 'public_set', 'public_batches',
    # model
    'load_pretrained', 'Pretrained', 'make_loss',
    # clients, round, ledger
    'Estimator', 'Subset', 'make_zo_step', 'make_client_update', 'Uplink', 'make_round', 'Round',
    'RoundOutput', 'Messages', 'Replies', 'replay', 'coefficients', 'address_key', 'address_keys',
    # cloud (ZGR)
    'make_cloud_step', 'CloudStep', 'CloudConfig', 'empty_pool', 'push', 'orthonormalize', 'Pool',
    'make_guidance', 'step_ratio', 'Guidance',
    # evaluation
    'evaluate', 'majority_rate',
    # algorithms and runs
    'make_algorithm', 'ALGORITHMS', 'register', 'Algorithm', 'Deployable', 'RoundResult',
    'parse',
    'train_and_evaluate',
]

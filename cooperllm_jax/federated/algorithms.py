"""Federated algorithms behind one interface, selected by name.

Every algorithm is an object with
    init(params) -> state                              the edge's state (a pytree)
    run_round(state, batches, counts, clients, round_index) -> (state, RoundResult)
    model_params(state) -> params                      plain model params (LoRA merged) to evaluate
where batches is {name: [C, S, B, ...]} (C sampled clients, S local steps), counts float32 [C]
(examples held by each client: the FedAvg weights) and clients int32 [C] (their ids). The state's
'lr' (float32) is the rate the rounds use: the divergence guard halves it without recompiling.
Between the clients and the edge, uploads pass through the simulated channel (federated/faults.py:
dropouts, stragglers, Byzantine clients, corrupt scalars; optional DP noise, federated/privacy.py)
and the edge aggregates what arrived (zo.Aggregation).

  fedmezo    ZO local steps (MeZO), uplink scalars, edge replays every client's ledger.
  fedkseed   K candidate seeds fixed for the run; one (seed index, scalar) per step; the model is
             init + sum_k a_k z_k, so a client syncs from the K accumulators (16 KB at K = 4096).
  decomfl    server-issued directions shared by all clients; scalars both ways; a client that missed
             rounds catches up by replaying the broadcast scalars of those rounds.
  fwdllm     directions chosen by cosine similarity to the previous global update, extra probes while
             the estimate is noisy (see federated/fwdllm.py).
  fedavg_bp  clients backprop with optax; FedAvg of dense deltas (the first-order upper bound).
"""

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import faults as faults_lib
from cooperllm_jax.federated import fedavg_bp, fwdllm, zo
from cooperllm_jax.federated import mesh as mesh_lib
from cooperllm_jax.federated.privacy import GaussianPrivacy
from cooperllm_jax.memory import compiled_memory
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo import quantized
from cooperllm_jax.zoo.perturb import master
from cooperllm_jax.zoo.spsa import Estimator
from cooperllm_jax.zoo.trainable import Subset

SCALAR_BYTES = 4
COUNT_BYTES = 4   # a client's example count, sent with its update


@dataclasses.dataclass
class RoundResult:
  losses: np.ndarray            # [C, S] mean training loss of each local step
  uplink_bytes: np.ndarray      # [C] bytes each client sent
  broadcast_bytes: int          # bytes of what this round adds to the global model, as broadcast
  forwards: np.ndarray          # [C] forward passes each client ran
  backwards: np.ndarray         # [C] backward passes each client ran
  uplink: Optional[zo.Uplink] = None  # the round's ledger as the edge received it, [C, S, P, ...]
  client_weights: Optional[np.ndarray] = None  # [C] FedAvg weights the edge used (0: not arrived)
  sent: Optional[np.ndarray] = None  # bool [C]: the client uploaded (privacy releases)
  guidance_bytes: int = 0       # what every sampled client receives for this round (ZGR's V)
  metrics: dict = dataclasses.field(default_factory=dict)  # algorithm-specific scalars to log


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class ZOAlgorithm:
  """The scalar protocols: fedmezo, fedkseed, decomfl, fwdllm."""
  name: str
  model: Any
  est: Estimator
  subset: Subset
  lr: float
  seed: int
  chunk: int = 1
  backend: str = 'map'
  kseed_candidates: int = 4096
  fwdllm_candidates: int = 4
  fwdllm_min_probes: int = 1
  fwdllm_var_threshold: float = 0.5
  base_weights: str = 'f32'     # frozen weights on the client: 'f32', 'int8', 'int4'
  base_group: int = 32          # columns per quantization scale
  mesh: Any = None              # clients split over its 'clients' axis (federated/mesh.py)
  aggregation: zo.Aggregation = zo.Aggregation()
  faults: Optional[faults_lib.Faults] = None
  privacy: Optional[GaussianPrivacy] = None

  def __post_init__(self):
    if self.base_weights not in quantized.FORMATS:
      raise ConfigError(f'unknown base_weights {self.base_weights!r}; choose one of '
                        f'{", ".join(quantized.FORMATS)}')
    if self.name == 'fedkseed' and self.kseed_candidates < 1:
      raise ConfigError(f'kseed_candidates must be >= 1, got {self.kseed_candidates}')
    if self.name == 'fwdllm':
      if self.fwdllm_candidates < 1:
        raise ConfigError(f'fwdllm_candidates must be >= 1, got {self.fwdllm_candidates}')
      if not 1 <= self.fwdllm_min_probes <= self.est.probes:
        raise ConfigError(f'fwdllm_min_probes={self.fwdllm_min_probes} must be in [1, probes='
                          f'{self.est.probes}] (probes is the maximum)')
      if self.fwdllm_var_threshold < 0:
        raise ConfigError(f'fwdllm_var_threshold must be >= 0, got {self.fwdllm_var_threshold}')
    if self.backend not in ('map', 'loop'):
      raise ConfigError(f"client_backend must be 'map' or 'loop', got {self.backend!r}")
    if self.chunk < 1:
      raise ConfigError(f'client_chunk must be >= 1, got {self.chunk}')
    if self.mesh is not None and self.backend != 'map':
      raise ConfigError("client_backend='loop' runs the clients one by one on one device; it "
                        'takes no mesh (set mesh.clients/data/model to 1)')
    loss = make_loss(self.model)
    if self.name == 'fwdllm':
      self.client_update = fwdllm.make_client_update(
          loss, self.est, self.subset, self.fwdllm_candidates, self.fwdllm_min_probes,
          self.fwdllm_var_threshold)
    else:
      address_fn = {'fedmezo': zo.own_addresses, 'cooperllm': zo.own_addresses, 'decomfl': zo.shared_addresses,
                    'fedkseed': zo.candidate_addresses(self.kseed_candidates)}[self.name]
      self.client_update = zo.make_client_update(loss, self.est, self.subset, address_fn)
    # Only what the clients read enters their jit (the cloud's state may live on other devices).
    self._clients = jax.jit(zo.make_clients_fn(self.client_update, seed=self.seed,
                                               chunk=self.chunk, mesh=self.mesh))
    self._jit_client = jax.jit(self.client_update)
    edge = functools.partial(zo.edge_replay, seed=self.seed, distribution=self.est.distribution,
                             shared=self.name == 'decomfl', aggregation=self.aggregation)

    def edge_fn(trainable, uplinks, client_weights, lr, guide):
      new = edge(trainable, uplinks=uplinks, client_weights=client_weights, lr=lr, guide=guide)
      if self.mesh is not None:  # every device replays the gathered scalars: stays replicated
        new = jax.lax.with_sharding_constraint(new, mesh_lib.replicated(self.mesh))
      return new

    # The edge updates the global weights in place, except FwdLLM's, whose next state needs the
    # old weights too (the previous update).
    self._edge = jax.jit(edge_fn, donate_argnums=() if self.name == 'fwdllm' else 0)

  # -- state ---------------------------------------------------------------------------------
  def init(self, params):
    trainable, frozen = self.subset.split(params, jax.random.key(self.seed))
    # Our own copy: rounds donate (update in place) the trainable weights, never the caller's; kept
    # as a float32 master (zoo.perturb.master) so the edge's replay loses no sub-ulp update.
    # Clients keep frozen weights quantized if asked: zoo/quantized.py.
    state = {'trainable': jax.tree.map(jnp.copy, master(trainable)),
             'frozen': quantized.quantize_frozen(frozen, self.base_weights, self.base_group),
             'lr': jnp.float32(self.lr)}
    if self.name == 'fwdllm':  # the previous global update, which guides the next directions
      state['prev_update'] = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    return self._on_mesh(state)

  def _on_mesh(self, tree):
    """tree as global arrays on the run's mesh (replicated, or as already placed there), so every
    process holds the same state and orbax can save it; unchanged without a mesh."""
    return tree if self.mesh is None else mesh_lib.replicate(tree, self.mesh)

  def model_params(self, state):
    return self.subset.materialize(quantized.dequantize_tree(state['frozen']), state['trainable'])

  # -- one round -----------------------------------------------------------------------------
  def _client_args(self, state):
    """(trainable, frozen, extra positional client args, guidance or None)."""
    extra = (state['prev_update'],) if self.name == 'fwdllm' else ()
    return state['trainable'], state['frozen'], extra, state.get('guidance')

  def _local_training(self, state, batches, clients, round_index):
    """(uplinks [C, S, P, ...], losses [C, S]) of the sampled clients' local training."""
    trainable, frozen, extra, guide = self._client_args(state)
    if self.backend == 'map':
      return self._clients(trainable, frozen, batches, clients, round_index, state['lr'], *extra,
                           guide=guide)
    guided = {} if guide is None else {'guide': guide}   # 'loop': one jitted call per client
    outs = []
    for i in range(len(clients)):
      b = jax.tree.map(lambda x: x[i], batches)
      _, uplink, losses = self._jit_client(trainable, frozen, b, self.seed, round_index,
                                           clients[i], state['lr'], *extra, **guided)
      outs.append((uplink, losses))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  def edge_update(self, trainable, uplinks: zo.Uplink, client_weights, lr, guide=None):
    """The edge's update of the global trainable weights from one round's received uplinks (the
    weights are donated); the ledger replay (experiments/replay.py) calls this same function."""
    return self._edge(trainable, uplinks, client_weights, lr, guide)

  def run_round(self, state, batches, counts, clients, round_index):
    ids = np.asarray(clients, np.int32)
    args = (batches, jnp.asarray(counts, jnp.float32), jnp.asarray(ids), jnp.int32(round_index))
    if self.mesh is not None:
      args = mesh_lib.place_round(self.mesh, *args)
    uplinks, losses = self._local_training(state, args[0], args[2], args[3])
    sent = jax.tree.map(np.asarray, uplinks)
    received = faults_lib.receive(sent, counts, ids, int(round_index), self.faults, self.privacy)
    new = self.edge_update(state['trainable'], received.uplink, received.client_weights,
                           state['lr'], state.get('guidance'))
    out = dict(state, trainable=new)
    if self.name == 'fwdllm':
      out['prev_update'] = jax.tree.map(
          lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), new, state['trainable'])
    return out, self._account(sent, np.asarray(losses), received)

  # -- accounting ----------------------------------------------------------------------------
  def _account(self, uplinks: zo.Uplink, losses, received: faults_lib.Received) -> RoundResult:
    """Bytes and passes of the clients that ran and sent (a dropped client: none); the broadcast
    holds the entries of the clients whose uploads the edge used."""
    used = (uplinks.weights > 0).sum(axis=(1, 2)) * received.sent      # [C] probes run and sent
    steps = uplinks.scalars.shape[1]
    per_probe_extra = {'fedkseed': math.ceil(math.log2(self.kseed_candidates) / 8),
                       'fwdllm': 1}.get(self.name, 0)                    # candidate index bytes
    up = used * (SCALAR_BYTES + per_probe_extra) + COUNT_BYTES
    if self.name == 'fwdllm':
      up = up + steps                                                   # probe count per step
    up = up * received.sent
    base_forwards = 0 if self.est.scheme == 'central' else steps
    forwards = (used * (2 if self.est.scheme == 'central' else 1) + base_forwards) * received.sent
    arrived = received.client_weights > 0
    if self.name == 'fedkseed':
      broadcast = self.kseed_candidates * SCALAR_BYTES                 # the K accumulators
    elif self.name == 'decomfl':
      broadcast = steps * self.est.probes * SCALAR_BYTES
    else:                                                               # every client's entries
      broadcast = int(up[arrived].sum()) + int(arrived.sum()) * 4       # + client ids
    return RoundResult(losses=losses, uplink_bytes=up.astype(np.int64), broadcast_bytes=broadcast,
                       forwards=forwards.astype(np.int64),
                       backwards=np.zeros_like(forwards, np.int64), uplink=received.uplink,
                       client_weights=received.client_weights, sent=received.sent,
                       metrics=dict(received.metrics))

  def dense_bytes(self, state) -> int:
    return tree_bytes(state['trainable'])

  def client_memory(self, state, batch_shapes) -> dict:
    """XLA's memory estimate of one client's jitted local training (S steps), from abstract shapes."""
    trainable, frozen, extra, guide = self._client_args(state)
    if guide is not None:
      extra = extra + (guide,)
    return compiled_memory(self.client_update, trainable, frozen, batch_shapes, self.seed, 1, 0,
                           self.lr, *extra, donate_argnums=0)

  @property
  def sync_bytes(self):
    """FedKSeed clients sync from the K accumulators whatever they missed; others replay rounds."""
    return self.kseed_candidates * SCALAR_BYTES if self.name == 'fedkseed' else None


@dataclasses.dataclass
class BPAlgorithm:
  """fedavg_bp: dense deltas up and down. Faults: dropouts and stragglers (dense uploads are not
  modelled as corruptible); the divergence guard's rate changes recompile the round."""
  model: Any
  lr: float
  weight_decay: float = 0.0
  chunk: int = 1
  faults: Optional[faults_lib.Faults] = None
  name: str = 'fedavg_bp'
  sync_bytes = None

  def __post_init__(self):
    self._client_update = self._make_client_update(self.lr)
    self._rounds = {}   # learning rate -> jitted round

  def _make_client_update(self, lr):
    return fedavg_bp.make_client_update(self.model, optax.adamw(lr, weight_decay=self.weight_decay))

  def init(self, params):
    return {'params': params, 'lr': jnp.float32(self.lr)}

  def model_params(self, state):
    return state['params']

  def dense_bytes(self, state) -> int:
    return tree_bytes(state['params'])

  def client_memory(self, state, batch_shapes) -> dict:
    """XLA's memory estimate of one client's jitted local training (S steps), from abstract shapes."""
    return compiled_memory(self._client_update, state['params'], batch_shapes, donate_argnums=())

  def run_round(self, state, batches, counts, clients, round_index):
    received = faults_lib.receive(None, counts, clients, round_index, self.faults)
    lr = float(state['lr'])
    if lr not in self._rounds:
      self._rounds[lr] = fedavg_bp.make_round(self._make_client_update(lr), chunk=self.chunk)
    params, losses = self._rounds[lr](state['params'], batches,
                                      jnp.asarray(received.client_weights))
    losses = np.asarray(losses)
    c, s = losses.shape
    dense = self.dense_bytes(state)
    steps = np.full(c, s, np.int64) * received.sent
    return dict(state, params=params), RoundResult(
        losses=losses, uplink_bytes=(dense + COUNT_BYTES) * received.sent.astype(np.int64),
        broadcast_bytes=dense, forwards=steps, backwards=steps,
        client_weights=received.client_weights, sent=received.sent, metrics=received.metrics)


ALGORITHMS = ('cooperllm', 'fedmezo', 'fedkseed', 'decomfl', 'fwdllm', 'fedavg_bp')


def robustness(config):
  """(aggregation, faults, privacy) from the config's aggregation*, faults and dp fields; a config
  without them gets FedAvg, no faults and no DP."""
  aggregation = zo.Aggregation(config.get('aggregation', 'mean'),
                               config.get('aggregation_trim', 0.2),
                               config.get('aggregation_clip', 1.0))
  return aggregation, faults_lib.Faults.from_config(config), GaussianPrivacy.from_config(config)


def make_algorithm(config, model, public=None):
  """The algorithm named by config.algorithm, configured from the config's fields. `public`: the
  cloud's tokenized public examples (cooperllm only; client_data.public_set)."""
  name = config.algorithm
  if name not in ALGORITHMS:
    raise ConfigError(f'unknown algorithm {name!r}; choose one of {", ".join(ALGORITHMS)}')
  mesh = mesh_lib.from_config(config)
  aggregation, faults, privacy = robustness(config)
  if name == 'fedavg_bp':
    if mesh is not None:
      raise ConfigError('fedavg_bp runs on one device: it takes no mesh (set mesh.* to 1)')
    if aggregation.rule != 'mean' or privacy is not None or (faults and faults.corrupts):
      raise ConfigError('fedavg_bp uploads dense deltas: aggregation, dp and the Byzantine/'
                        'nonfinite faults apply to the scalar protocols only')
    return BPAlgorithm(model, config.learning_rate, config.weight_decay, config.client_chunk,
                       faults)
  z = config.zo
  est = Estimator(eps=z.eps, probes=z.probes, scheme=z.scheme, distribution=z.distribution,
                  clip=z.clip, perturb_impl=z.perturb_impl)
  subset = Subset(z.trainable, z.lora_rank, z.lora_alpha, tuple(z.lora_targets))
  common = dict(chunk=config.client_chunk, backend=config.client_backend,
                base_weights=z.base_weights, base_group=z.base_group, mesh=mesh,
                aggregation=aggregation, faults=faults, privacy=privacy)
  if name == 'cooperllm':
    from cooperllm_jax.cloud.bp import CloudConfig  # pylint: disable=g-import-not-at-top
    from cooperllm_jax.federated.cooperllm import CooperLLM  # pylint: disable=g-import-not-at-top
    g, c = config.zgr, config.cloud
    return CooperLLM(name, model, est, subset, config.learning_rate, config.seed, **common,
                     public=public,
                     cloud=CloudConfig(c.mode, c.learning_rate, c.weight_decay),
                     cloud_batches=c.batches, cloud_batch_size=c.batch_size, cloud_lag=c.lag,
                     cloud_devices=c.devices, pool_size=g.pool_size, refresh=g.refresh,
                     alpha=g.alpha, adaptive=g.adaptive, alpha_min=g.alpha_min,
                     alpha_max=g.alpha_max, beta=g.beta, ema=g.ema,
                     guidance_format=g.guidance_format, guidance_block=g.guidance_block,
                     guidance_budget_bytes=g.guidance_budget_bytes, guidance_topk=g.guidance_topk)
  return ZOAlgorithm(name, model, est, subset, config.learning_rate, config.seed, **common,
                     kseed_candidates=z.kseed_candidates, fwdllm_candidates=z.fwdllm_candidates,
                     fwdllm_min_probes=z.fwdllm_min_probes,
                     fwdllm_var_threshold=z.fwdllm_var_threshold)

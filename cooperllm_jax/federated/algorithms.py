"""Federated algorithms behind one interface, selected by name.

Every algorithm is an object with
    init(params) -> state                              the edge's state (a pytree)
    run_round(state, batches, counts, clients, round_index) -> (state, RoundResult)
    model_params(state) -> params                      plain model params (LoRA merged) to evaluate
where batches is {name: [C, S, B, ...]} (C sampled clients, S local steps), counts float32 [C]
(examples held by each client: the FedAvg weights) and clients int32 [C] (their ids).

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
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import fedavg_bp, fwdllm, zo
from cooperllm_jax.memory import compiled_memory
from cooperllm_jax.models.common import make_loss
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
  uplink: Optional[zo.Uplink] = None  # the round's ledger (scalar protocols), [C, S, P, ...]
  guidance_bytes: int = 0       # what every sampled client receives for this round (ZGR's V)
  metrics: dict = dataclasses.field(default_factory=dict)  # algorithm-specific scalars to log


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# The state a round's clients and edge replay read (the rest, e.g. the cloud's, stays outside).
CLIENT_VISIBLE = ('trainable', 'frozen', 'prev_update', 'guidance')


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

  def __post_init__(self):
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
    loss = make_loss(self.model)
    if self.name == 'fwdllm':
      self.client_update = fwdllm.make_client_update(
          loss, self.est, self.subset, self.fwdllm_candidates, self.fwdllm_min_probes,
          self.fwdllm_var_threshold)
    else:
      address_fn = {'fedmezo': zo.own_addresses, 'cooperllm': zo.own_addresses, 'decomfl': zo.shared_addresses,
                    'fedkseed': zo.candidate_addresses(self.kseed_candidates)}[self.name]
      self.client_update = zo.make_client_update(loss, self.est, self.subset, address_fn)
    self._round_fn = zo.make_round_fn(self.client_update, seed=self.seed, lr=self.lr,
                                      chunk=self.chunk, distribution=self.est.distribution,
                                      shared=self.name == 'decomfl')
    self._jit_round = jax.jit(
        lambda t, rest, *args: self._round(dict(rest, trainable=t), *args), donate_argnums=0)
    self._jit_client = jax.jit(self.client_update)

  # -- state ---------------------------------------------------------------------------------
  def init(self, params):
    trainable, frozen = self.subset.split(params, jax.random.key(self.seed))
    # Our own copy: rounds donate (update in place) the trainable weights, never the caller's.
    state = {'trainable': jax.tree.map(jnp.copy, trainable), 'frozen': frozen}
    if self.name == 'fwdllm':  # the previous global update, which guides the next directions
      state['prev_update'] = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    return state

  def model_params(self, state):
    return self.subset.materialize(state['frozen'], state['trainable'])

  # -- one round -----------------------------------------------------------------------------
  def _client_args(self, state):
    """(trainable, frozen, extra positional client args, guidance or None)."""
    extra = (state['prev_update'],) if self.name == 'fwdllm' else ()
    return state['trainable'], state['frozen'], extra, state.get('guidance')

  def _round(self, state, batches, counts, clients, round_index):
    trainable, frozen, extra, guide = self._client_args(state)
    new, uplinks, losses = self._round_fn(trainable, frozen, batches, counts, clients,
                                          round_index, *extra, guide=guide)
    return self._next_state(state, new), uplinks, losses

  def _next_state(self, state, new):
    out = dict(state, trainable=new)
    if self.name == 'fwdllm':
      out['prev_update'] = jax.tree.map(
          lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), new, state['trainable'])
    return out

  def _loop_round(self, state, batches, counts, clients, round_index):
    """The debugging backend: one un-batched jitted call per client, then the same edge replay."""
    trainable, frozen, extra, guide = self._client_args(state)
    guided = {} if guide is None else {'guide': guide}
    outs = []
    for i in range(len(clients)):
      b = jax.tree.map(lambda x: x[i], batches)
      _, uplink, losses = self._jit_client(trainable, frozen, b, self.seed, round_index,
                                           clients[i], self.lr, *extra, **guided)
      outs.append((uplink, losses))
    uplinks, losses = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    new = zo.edge_replay(trainable, self.seed, uplinks, counts / counts.sum(), self.lr,
                         self.est.distribution, self.name == 'decomfl', guide)
    return self._next_state(state, new), uplinks, losses

  def run_round(self, state, batches, counts, clients, round_index):
    args = (batches, jnp.asarray(counts, jnp.float32), jnp.asarray(clients, jnp.int32),
            jnp.int32(round_index))
    # Only what the clients and the edge's replay read enters the round's jit: other state (the
    # cloud's, which may live on other devices) neither crosses devices nor is copied through.
    visible = {k: v for k, v in state.items() if k in CLIENT_VISIBLE}
    if self.backend == 'map':
      rest = {k: v for k, v in visible.items() if k != 'trainable'}
      visible, uplinks, losses = self._jit_round(visible['trainable'], rest, *args)
    else:
      visible, uplinks, losses = self._loop_round(visible, *args)
    uplinks = jax.tree.map(np.asarray, uplinks)
    return dict(state, **visible), self._account(uplinks, np.asarray(losses))

  # -- accounting ----------------------------------------------------------------------------
  def _account(self, uplinks: zo.Uplink, losses) -> RoundResult:
    used = (uplinks.weights > 0).sum(axis=(1, 2))                      # [C] probes run
    steps = uplinks.scalars.shape[1]
    per_probe_extra = {'fedkseed': math.ceil(math.log2(self.kseed_candidates) / 8),
                       'fwdllm': 1}.get(self.name, 0)                    # candidate index bytes
    up = used * (SCALAR_BYTES + per_probe_extra) + COUNT_BYTES
    if self.name == 'fwdllm':
      up = up + steps                                                   # probe count per step
    base_forwards = 0 if self.est.scheme == 'central' else steps
    forwards = used * (2 if self.est.scheme == 'central' else 1) + base_forwards
    clients = uplinks.scalars.shape[0]
    if self.name == 'fedkseed':
      broadcast = self.kseed_candidates * SCALAR_BYTES                 # the K accumulators
    elif self.name == 'decomfl':
      broadcast = steps * self.est.probes * SCALAR_BYTES
    else:                                                               # every client's entries
      broadcast = int(up.sum()) + clients * 4                           # + client ids
    return RoundResult(losses=losses, uplink_bytes=up.astype(np.int64), broadcast_bytes=broadcast,
                       forwards=forwards.astype(np.int64),
                       backwards=np.zeros_like(forwards, np.int64), uplink=uplinks)

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
  """fedavg_bp: dense deltas up and down."""
  model: Any
  lr: float
  weight_decay: float = 0.0
  chunk: int = 1
  name: str = 'fedavg_bp'
  sync_bytes = None

  def __post_init__(self):
    optimizer = optax.adamw(self.lr, weight_decay=self.weight_decay)
    self._client_update = fedavg_bp.make_client_update(self.model, optimizer)
    self._round = fedavg_bp.make_round(self._client_update, chunk=self.chunk)

  def init(self, params):
    return {'params': params}

  def model_params(self, state):
    return state['params']

  def dense_bytes(self, state) -> int:
    return tree_bytes(state['params'])

  def client_memory(self, state, batch_shapes) -> dict:
    """XLA's memory estimate of one client's jitted local training (S steps), from abstract shapes."""
    return compiled_memory(self._client_update, state['params'], batch_shapes, donate_argnums=())

  def run_round(self, state, batches, counts, clients, round_index):
    del round_index
    params, losses = self._round(state['params'], batches, jnp.asarray(counts, jnp.float32))
    losses = np.asarray(losses)
    c, s = losses.shape
    dense = self.dense_bytes(state)
    steps = np.full(c, s, np.int64)
    return {'params': params}, RoundResult(
        losses=losses, uplink_bytes=np.full(c, dense + COUNT_BYTES, np.int64),
        broadcast_bytes=dense, forwards=steps, backwards=steps)


ALGORITHMS = ('cooperllm', 'fedmezo', 'fedkseed', 'decomfl', 'fwdllm', 'fedavg_bp')


def make_algorithm(config, model, public=None):
  """The algorithm named by config.algorithm, configured from the config's fields. `public`: the
  cloud's tokenized public examples (cooperllm only; client_data.public_set)."""
  name = config.algorithm
  if name not in ALGORITHMS:
    raise ConfigError(f'unknown algorithm {name!r}; choose one of {", ".join(ALGORITHMS)}')
  if name == 'fedavg_bp':
    return BPAlgorithm(model, config.learning_rate, config.weight_decay, config.client_chunk)
  z = config.zo
  est = Estimator(eps=z.eps, probes=z.probes, scheme=z.scheme, distribution=z.distribution,
                  clip=z.clip)
  subset = Subset(z.trainable, z.lora_rank, z.lora_alpha, tuple(z.lora_targets))
  common = dict(chunk=config.client_chunk, backend=config.client_backend)
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
                     alpha_max=g.alpha_max, beta=g.beta, ema=g.ema)
  return ZOAlgorithm(name, model, est, subset, config.learning_rate, config.seed, **common,
                     kseed_candidates=z.kseed_candidates, fwdllm_candidates=z.fwdllm_candidates,
                     fwdllm_min_probes=z.fwdllm_min_probes,
                     fwdllm_var_threshold=z.fwdllm_var_threshold)

"""CooperLLM: zeroth-order clients whose perturbations the cloud's BP directions guide (ZGR).

Per round r (the FedMeZO protocol plus the cloud tier):
  1. cloud   every `refresh` rounds, BP on a few public batches at the global model (gradient mode)
             or k AdamW steps of its own (finetune mode) gives a direction, pushed into a pool of
             the last m; with cloud_lag=1 the direction used in round r was computed from round
             r-1's model, so the cloud's BP runs concurrently with round r-1's clients (async
             dispatch; on disjoint devices when the host has several).
  2. edge    orthonormalizes the pool into V (QR) and sends (V, alpha) down with the ledger, V
             coded by system/codec.py (`guidance_format`: f32, int8, int4, ternary, 'adaptive':
             one format per leaf under `guidance_budget_bytes`, or 'link': the same under the
             budget the simulated links allow, `link_budget`); stochastic rounding is keyed by
             (seed, round) through the key schedule;
  3. clients probe along z = beta (sqrt(alpha) v + probe_v sqrt(1-alpha) V u) from their probe keys
             and step along the plain part at lr and along V at the first-order rate lr_v
             (zoo/guided.py: both scales free of d), run local ZO steps and upload only scalars;
  4. edge    replays every client's (address, scalar) entries under the same V.
The client, replay and accounting are FedMeZO's (ZOAlgorithm); this class adds the cloud, the pool
and the mixing. Adaptive mixing sets alpha each round from the paper's optimal weight on the cloud,

    lambda* = d sigma^2 / (d sigma^2 + |b|^2 + tau^2),     alpha = 1 - lambda* (clipped),

with every term estimated online from the round's own scalars (see `probe_moments`).

Quantized guidance: the clients and the edge's replay both use the decoded V, so replay stays exact.
The decoded V is not exactly orthonormal (each entry is off by an unbiased rounding error, about
guidance_rel_error of |V|^2 in all), and we use it as it is: the estimator's covariance becomes
alpha I + (1 - alpha) (d/m) V'V'^T for the V' actually sent, still replayable, and the mixing
estimates (which assume V'^T V' = I) are off by that relative error. Re-orthonormalizing on the
clients would cost a QR per client and round, and the edge's replay would then be exact only if
every client's QR rounded exactly like the edge's.
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax.cloud import bp as cloud_bp
from cooperllm_jax.cloud import pool as pool_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.algorithms import SCALAR_BYTES, RoundResult, ZOAlgorithm
from cooperllm_jax.federated.zo import SHARED, Uplink
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.models.spec import path_str
from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.zoo import guided
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.quantized import dequantize_tree

CODEC_PATH = ('__guidance__', 'codec')  # the downlink's rounding stream: a path no model has
GUIDANCE_FORMATS = codec_lib.FORMATS + codec_lib.ALLOCATIONS


def probe_moments(uplinks: Uplink, counts, guide: guided.Guidance, seed, distribution: str):
  """(E[g^2], E[g u] [m]) over the round's used probes, FedAvg-weighted.

  With E[z z^T] = a2 I + c V V^T and z's subspace part sqrt(c) V u, a probe's scalar g = z . grad
  has E[g u_j] = sqrt(c) V_j . grad and E[g^2] = a2 |grad|^2 + c |V^T grad|^2: the private
  gradient's projection onto the cloud subspace and its norm come from scalars the edge already has.
  """
  m = guide.valid.shape[0]
  keys = keys_lib.address_keys(seed, uplinks.addresses.reshape(-1, 4))
  u = jax.vmap(lambda k: guided.subspace_draw(k, m, distribution))(keys)
  w = (uplinks.weights * (counts / counts.sum())[:, None, None]).reshape(-1)
  w = w / jnp.maximum(w.sum(), 1e-30)
  g = uplinks.scalars.reshape(-1).astype(jnp.float32)
  return jnp.sum(w * g * g), jnp.sum((w * g)[:, None] * u, axis=0)


def mixing_estimates(mean_g2, mean_gu, guide: guided.Guidance):
  """(|grad|^2, |V^T grad|^2) of the private loss from probe_moments (see there)."""
  a2, c = guided.covariance_diag_and_subspace(guide)
  proj = jnp.where(c > 0, mean_gu / jnp.sqrt(jnp.where(c > 0, c, 1.0)), 0.0) * guide.valid
  proj_sq = jnp.sum(proj ** 2)
  grad_sq = jnp.where(a2 > 0, (mean_g2 - c * proj_sq) / jnp.where(a2 > 0, a2, 1.0), proj_sq)
  return jnp.maximum(grad_sq, proj_sq), proj_sq


def optimal_alpha(grad_sq, proj_sq, tau_sq, d: int, probes_per_step: int, lo: float, hi: float):
  """alpha = 1 - lambda*: the ZO noise per coordinate of an update averaging N probes is
  sigma^2 = |grad|^2 / N (SPSA's variance is ~|grad|^2 per coordinate), the cloud direction's bias
  is what its subspace misses, |b|^2 = |grad|^2 - |V^T grad|^2, and tau^2 is the variance of the
  cloud's gradient from its public batches."""
  zo_noise = d * grad_sq / probes_per_step
  lam = zo_noise / jnp.maximum(zo_noise + jnp.maximum(grad_sq - proj_sq, 0.0) + tau_sq, 1e-30)
  return jnp.clip(1.0 - lam, lo, hi), lam


@dataclasses.dataclass
class CooperLLM(ZOAlgorithm):
  """ZGR on the scalar protocol: see the module docstring. `public` holds the cloud's tokenized
  public examples {input_ids, attention_mask, labels} (client_data.public_set)."""
  public: Optional[dict] = None
  cloud: cloud_bp.CloudConfig = dataclasses.field(default_factory=cloud_bp.CloudConfig)
  cloud_batches: int = 2
  cloud_batch_size: int = 32
  cloud_lag: int = 0
  cloud_devices: int = 0
  pool_size: int = 1
  refresh: int = 1
  alpha: float = 0.5
  adaptive: bool = False
  alpha_min: float = 0.05
  alpha_max: float = 0.95
  beta: float = 1.0
  # ZGR's d-free scales (zoo/guided.py): the probe's radius along V relative to the plain part's,
  # and the first-order rate of the step along V (the guidance carries step_v = lr_v / lr).
  probe_v: float = guided.DEFAULT_PROBE_V
  lr_v: float = guided.DEFAULT_LR_V
  ema: float = 0.8
  guidance_format: str = 'f32'
  guidance_block: int = 256
  guidance_budget_bytes: int = 0     # adaptive: bytes of V per client and round
  # 'link': sampled clients -> the round's byte budget (train_and_evaluate sets
  # system.clock.SimulatedClock.guidance_budget: what SPC hides behind the slowest client's compute)
  link_budget: Optional[Callable] = None
  guidance_topk: Optional[float] = None

  def __post_init__(self):
    checks = [(self.public is not None and len(self.public.get('labels', ())) > 0,
               'cooperllm needs public examples for the cloud (public_fraction > 0)'),
              (self.cloud_batches >= 1, f'cloud.batches must be >= 1, got {self.cloud_batches}'),
              (self.cloud_batch_size >= 1,
               f'cloud.batch_size must be >= 1, got {self.cloud_batch_size}'),
              (self.cloud_lag in (0, 1), f'cloud.lag must be 0 or 1, got {self.cloud_lag}'),
              (self.cloud_devices >= 0, f'cloud.devices must be >= 0, got {self.cloud_devices}'),
              (not self.cloud_devices or self.mesh is None,
               f'cloud.devices={self.cloud_devices} gives the cloud devices of its own, but the run '
               'has a mesh (mesh.*), whose data/model axes the cloud uses: set one of the two'),
              (self.pool_size >= 1, f'zgr.pool_size must be >= 1, got {self.pool_size}'),
              (self.refresh >= 1, f'zgr.refresh must be >= 1, got {self.refresh}'),
              (0.0 <= self.alpha <= 1.0, f'zgr.alpha must be in [0, 1], got {self.alpha}'),
              (0.0 < self.alpha_min <= self.alpha_max < 1.0,
               f'zgr.alpha_min/alpha_max must satisfy 0 < min <= max < 1 (both parts must stay '
               f'estimable), got {self.alpha_min}, {self.alpha_max}'),
              (self.beta > 0, f'zgr.beta must be > 0, got {self.beta}'),
              (self.probe_v > 0, f'zgr.probe_v must be > 0, got {self.probe_v}'),
              (self.lr_v >= 0, f'zgr.lr_v must be >= 0, got {self.lr_v}'),
              (0.0 <= self.ema < 1.0, f'zgr.ema must be in [0, 1), got {self.ema}'),
              (self.guidance_format in GUIDANCE_FORMATS,
               f'zgr.guidance_format must be one of {", ".join(GUIDANCE_FORMATS)}, got '
               f'{self.guidance_format!r}'),
              (self.guidance_format != 'adaptive' or self.guidance_budget_bytes > 0,
               'zgr.guidance_format=adaptive needs zgr.guidance_budget_bytes > 0')]
    for ok, message in checks:
      if not ok:
        raise ConfigError(message)
    self._codec('f32')  # checks guidance_block and guidance_topk now rather than in round 1
    super().__post_init__()
    self._client_device = self._place()
    self._cloud = cloud_bp.make_cloud_step(make_loss(self.model), self.subset, self.cloud,
                                           mesh=self.cloud_mesh, model=self.model)
    self._orthonormalize = jax.jit(pool_lib.orthonormalize)
    self._push = jax.jit(pool_lib.push)
    self._moments = jax.jit(probe_moments, static_argnames='distribution')

  def _place(self):
    """The clients' device (None: the default one, or the run's mesh) and the cloud's mesh
    (`cloud_mesh`: the run's mesh, or None). With cloud_devices=n the cloud gets the last n devices
    as its own mesh and the clients device 0, so the two tiers overlap for real."""
    self.cloud_mesh = self.mesh
    if not self.cloud_devices:
      return None
    devices = jax.devices()
    if self.cloud_devices >= len(devices):
      raise ConfigError(f'cloud.devices={self.cloud_devices} leaves no device for the clients '
                        f'({len(devices)} devices)')
    from cooperllm_jax.cloud import sharding  # pylint: disable=g-import-not-at-top
    self.cloud_mesh = sharding.make_mesh(data=self.cloud_devices, model=1,
                                         devices=devices[-self.cloud_devices:])
    return devices[0]

  # -- state ---------------------------------------------------------------------------------
  def init(self, params):
    state = super().init(params)
    trainable = state['trainable']
    self._d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))  # d of the estimator
    state['pool'] = pool_lib.empty_pool(trainable, self.pool_size)
    state['cloud'] = self._cloud.init(trainable)
    # An empty basis (plain ZO directions) until the cloud's first direction arrives; present from
    # the start so the state's structure (checkpoints, memory analysis) never changes.
    state['guidance'] = self._guidance(state['pool'].directions, jnp.zeros(self.pool_size),
                                       self.alpha)
    _, state['downlink'] = self._downlink(state['pool'].directions, 0)
    state['mixing'] = {'grad_sq': jnp.float32(0), 'proj_sq': jnp.float32(0),
                       'tau_sq': jnp.float32(0), 'seen': jnp.int32(0)}
    if self.cloud_lag:
      state['pending'] = {'direction': jax.tree.map(jnp.zeros_like, trainable),
                          'tau_sq': jnp.float32(0), 'ready': jnp.bool_(False)}
    return self._on_mesh(state)

  def _cloud_direction(self, state, round_index):
    """Runs the cloud on this round's public batches at the current global model (async)."""
    batches = client_data.public_batches(self.public, self.cloud_batches, self.cloud_batch_size,
                                         self.seed, round_index)
    trainable, frozen = state['trainable'], dequantize_tree(state['frozen'])
    # The round donates the global weights: on the devices it shares with the clients (one device
    # or the run's mesh) the cloud reads its own copy; on its own, placing copies them there.
    if self._client_device is None:
      trainable = jax.tree.map(jnp.copy, trainable)
    trainable, frozen, batches = self._cloud.place(trainable, frozen, batches)
    cloud_state, direction, stats = self._cloud.step(state['cloud'], trainable, frozen, batches)
    if self._client_device is not None:
      direction = jax.device_put(direction, self._client_device)
    return cloud_state, direction, stats

  def _guidance(self, basis, valid, alpha):
    return guided.make_guidance(basis, valid, alpha, self.beta, self.probe_v,
                                guided.step_ratio(self.lr_v, self.lr))

  def _alpha(self, state, clients: int):
    if not self.adaptive:
      return jnp.float32(self.alpha)
    mix = state['mixing']
    alpha, _ = optimal_alpha(mix['grad_sq'], mix['proj_sq'], mix['tau_sq'], self._d,
                             self.est.probes * clients, self.alpha_min, self.alpha_max)
    # Before any estimate exists, start from the middle of the allowed range.
    return jnp.where(mix['seen'] > 0, alpha, 0.5 * (self.alpha_min + self.alpha_max))

  def run_round(self, state, batches, counts, clients, round_index):
    state = dict(state)
    refresh = (round_index - 1) % self.refresh == 0
    tau_sq = None
    if refresh:
      if self.cloud_lag:
        pending = state['pending']
        state['cloud'], direction, stats = self._cloud_direction(state, round_index)
        if bool(pending['ready']):
          state['pool'] = self._push(state['pool'], pending['direction'])
          tau_sq = float(pending['tau_sq'])
        state['pending'] = {'direction': direction, 'tau_sq': stats['variance'],
                            'ready': jnp.bool_(True)}
      else:
        state['cloud'], direction, stats = self._cloud_direction(state, round_index)
        state['pool'] = self._push(state['pool'], direction)
        tau_sq = float(stats['variance'])
      basis, valid = self._orthonormalize(state['pool'])
      basis, state['downlink'] = self._downlink(basis, round_index, clients)
    else:
      basis, valid = state['guidance'].basis, state['guidance'].valid
    if tau_sq is not None:
      state['mixing'] = dict(state['mixing'], tau_sq=jnp.float32(tau_sq))
    state['guidance'] = self._guidance(basis, valid, self._alpha(state, len(clients)))
    state, result = super().run_round(state, batches, counts, clients, round_index)
    self._update_mixing(state, result, result.client_weights)
    self._account_guidance(state, result)
    return self._on_mesh(state), result

  # -- the guidance downlink -----------------------------------------------------------------
  def _codec(self, fmt: str) -> codec_lib.LeafCodec:
    return codec_lib.LeafCodec(fmt, self.guidance_block, self.guidance_topk)

  def _budget(self, basis, clients) -> int:
    """The round's byte budget for V: given ('adaptive') or from the sampled clients' links
    ('link'; before any round, room for all of V in float32)."""
    if self.guidance_format == 'adaptive':
      return self.guidance_budget_bytes
    if clients is None:
      return codec_lib.tree_nbytes(basis, self._codec('f32'))
    if self.link_budget is None:
      raise ConfigError("zgr.guidance_format='link' takes its byte budget from the run's "
                        'simulated links: set CooperLLM.link_budget (train_and_evaluate does)')
    # Below the coarsest codes the link cannot hide V at all: send those (the round waits).
    floor = sum(min(codec_lib.LeafCodec(f, self.guidance_block, self.guidance_topk).nbytes(x.shape)
                    for f in codec_lib.FORMATS) for x in jax.tree.leaves(basis))
    return max(int(self.link_budget(clients)), floor)

  def _downlink(self, basis, round_index, clients=None):
    """(V as the clients receive it, record): V coded and decoded leaf by leaf; the record holds
    each leaf's format (index into codec.FORMATS) and |V' - V|^2 / |V|^2."""
    if self.guidance_format in codec_lib.ALLOCATIONS:
      codecs = codec_lib.allocate(basis, self._budget(basis, clients), block=self.guidance_block,
                                  topk=self.guidance_topk).codecs
    else:
      codecs = self._codec(self.guidance_format)
    key = keys_lib.leaf_key(keys_lib.address_key(self.seed, (round_index, SHARED, SHARED, SHARED)),
                            CODEC_PATH)
    sent = codec_lib.roundtrip_tree(basis, codecs, key)
    diff = jax.tree.map(jnp.subtract, sent, basis)
    norm = pool_lib.tree_dot(basis, basis)
    formats = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.int32(codec_lib.FORMATS.index(codec_lib.codec_of(codecs, p).fmt)), basis)
    rel_error = jnp.where(norm > 0, pool_lib.tree_dot(diff, diff) / jnp.where(norm > 0, norm, 1.0),
                          0.0)
    return sent, {'formats': formats, 'rel_error': rel_error}

  def _account_guidance(self, state, result: RoundResult):
    """Every sampled client receives the round's guidance (and one catching up on this round
    needs it too): the codec's exact wire bytes of V, alpha, and with 'adaptive' one format byte
    per leaf."""
    formats = {path_str(p): codec_lib.FORMATS[int(i)]
               for p, i in jax.tree_util.tree_flatten_with_path(state['downlink']['formats'])[0]}
    codecs = {name: self._codec(fmt) for name, fmt in formats.items()}
    guidance = codec_lib.tree_nbytes(state['guidance'].basis, codecs) + SCALAR_BYTES
    if self.guidance_format in codec_lib.ALLOCATIONS:
      guidance += len(codecs)
      result.metrics['guidance_formats'] = formats
    result.guidance_bytes = guidance
    result.broadcast_bytes += guidance
    result.metrics['guidance_rel_error'] = float(state['downlink']['rel_error'])

  def _update_mixing(self, state, result: RoundResult, counts):
    """EMA of the private gradient's norm and its cloud-subspace share; logged with the round.
    counts: the weights of the uploads the edge used (a round none arrived in tells nothing)."""
    guide = state['guidance']
    if not np.any(counts > 0):
      result.metrics.update(alpha=float(guide.alpha), basis_rank=int(guide.valid.sum()))
      return
    uplinks = jax.tree.map(jnp.asarray, result.uplink)
    g2, gu = self._moments(uplinks, jnp.asarray(counts, jnp.float32), guide, self.seed,
                           distribution=self.est.distribution)
    grad_sq, proj_sq = mixing_estimates(g2, gu, guide)
    mix = state['mixing']
    first = mix['seen'] == 0
    decay = jnp.where(first, 0.0, self.ema)
    mix = dict(mix, grad_sq=decay * mix['grad_sq'] + (1 - decay) * grad_sq,
               proj_sq=decay * mix['proj_sq'] + (1 - decay) * proj_sq, seen=mix['seen'] + 1)
    state['mixing'] = mix
    _, lam = optimal_alpha(mix['grad_sq'], mix['proj_sq'], mix['tau_sq'], self._d,
                           self.est.probes * len(counts), self.alpha_min, self.alpha_max)
    result.metrics.update(
        alpha=float(guide.alpha), basis_rank=int(guide.valid.sum()),
        grad_sq=float(grad_sq), cloud_share=float(proj_sq / max(float(grad_sq), 1e-30)),
        cloud_tau_sq=float(mix['tau_sq']), lambda_star=float(lam))

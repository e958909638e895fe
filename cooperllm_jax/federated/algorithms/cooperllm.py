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
             with zgr.line_search (the default) the round's V rate is at most the step the
             cloud's backtracking line search accepted on its public loss over the round's V
             displacement, and the plain rate shrinks by the same factor as that step since
             round 1 (the sharpening since lr was tuned; docs/zgr.md);
  4. edge    replays every client's (address, scalar) entries under the same V.
The client, replay and accounting are FedMeZO's: `CooperLLM` composes that protocol with a
`CloudGuidance` component (the cloud, the pool, the downlink codec and the mixing), which prepares
each round's guidance before the clients run and learns from their scalars afterwards.

Adaptive mixing (zgr.adaptive): after each round the edge regresses the scalars on the probes'
subspace draws u (zoo/mixing.py), which estimates the private gradient's projection |V^T grad|^2
and its norm |grad|^2 with standard errors and without the old estimator's d/m amplification;
pooled across rounds by precision (zgr.ema is the forgetting factor; the precision taken at the
pooled value before the round, so a round that came out low does not count more), they set the weight on the
next round's step along V to its one-step optimal shrinkage under the measured noise
(mixing.adaptive_mixing; 0 before the first estimate), so a cloud whose subspace misses the
private gradient loses its step and the step's effective rate follows the scalars'
signal-to-noise ratio. alpha stays zgr.alpha. Everything is a function of what the edge has, so
the replay stays exact.

The state is typed (ZGRState in ServerState.extra: the pool, the cloud's own state, the round's
guidance, the downlink's record, the mixing estimates and, with cloud.lag, the pending direction);
each step returns a new one. The config section is `zgr` (ZGR).

Quantized guidance: the clients and the edge's replay both use the decoded V, so replay stays exact.
The decoded V is not exactly orthonormal (each entry is off by an unbiased rounding error, about
guidance_rel_error of |V|^2 in all), and we use it as it is: the estimator's covariance becomes
alpha I + (1 - alpha) (d/m) V'V'^T for the V' actually sent, still replayable, and the mixing
estimates (which assume V'^T V' = I) are off by that relative error. Re-orthonormalizing on the
clients would cost a QR per client and round, and the edge's replay would then be exact only if
every client's QR rounded exactly like the edge's.
"""

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.cloud import bp as cloud_bp
from cooperllm_jax.cloud import pool as pool_lib
from cooperllm_jax.config import field
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.algorithms.fedmezo import FedMeZO
from cooperllm_jax.federated.algorithms.scalar import OnScalarProtocol
from cooperllm_jax.federated.api import (SCALAR_BYTES, Costs, Deployable, GuidanceCosts,
                                         RoundResult, ServerState)
from cooperllm_jax.federated.clients import SHARED
from cooperllm_jax.federated.registry import register
from cooperllm_jax.mesh import make_mesh
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.models.spec import path_str
from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.system.workload import BACKWARD_FACTOR
from cooperllm_jax.tree_math import tree_dot
from cooperllm_jax.zoo import guided
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo import mixing
from cooperllm_jax.zoo.quantized import dequantize_tree

CODEC_PATH = ('__guidance__', 'codec')  # the downlink's rounding stream: a path no model has
TRACE_PATH = ('__cloud__', 'trace')     # the cloud's Hutchinson probes
GUIDANCE_FORMATS = codec_lib.FORMATS + codec_lib.ALLOCATIONS
_ALPHA_FIXED = 'the adaptive mixing no longer moves alpha'


@dataclasses.dataclass(frozen=True)
class ZGR:
  """Guided probes z = beta (sqrt(alpha) v + probe_v sqrt(1-alpha) V u), steps along V at the
  first-order rate lr_v (zoo/guided.py: both free of d): cooperllm's config section `zgr`."""
  alpha: float = field(0.5, 'share of the random part of a probe; 1 = plain ZO (FedMeZO)')
  adaptive: bool = field(False, "the step along V weighted by the edge's estimates of its noise")
  ema: float = field(0.8, "forgetting factor of the adaptive estimates' pooling")
  pool_size: int = field(1, 'm: the last m cloud directions span V')
  refresh: int = field(1, 'the cloud computes a new direction every this many rounds')
  beta: float = field(1.0, "scale of a probe's plain part (1 with alpha = 1: plain ZO)")
  probe_v: float = field(guided.DEFAULT_PROBE_V, "a probe's radius along V over its plain part's")
  # The largest rate with line_search, which backs off from it as the loss sharpens.
  lr_v: float = field(guided.DEFAULT_LR_V, 'first-order rate of the step along V (free of d)')
  # L_V: the public loss's curvature along the cloud's newest direction (the cloud measures it
  # each refresh: one Hessian-vector product).
  curvature_cap: float = field(0.0, '> 0: the rate along V at most this / L_V')
  # tr H: the public loss's Hessian trace (Hutchinson, trace_probes Hessian-vector products on the
  # cloud each refresh).
  trace_cap: float = field(0.0, "> 0: the plain step's rate at most this / (lr tr H)")
  trace_probes: int = field(4, "Hessian-vector products of the cloud's tr H estimate")
  # The rate along V at most the step the cloud's backtracking line search accepts on the public
  # loss over a round's V displacement, and the plain step slowed by the same factor the accepted
  # step shrank since the first round.
  line_search: int = field(12, "> 0: the line search's halvings of lr_v tried; 0 = off")
  guidance_format: str = field('f32', 'V on the downlink: f32 | int8 | int4 | ternary | '
                               'adaptive | link')
  guidance_block: int = field(256, 'values per codec scale')
  guidance_budget_bytes: int = field(0, 'adaptive: bytes of V per client and round (> 0)')
  guidance_topk: Optional[float] = field(None, "keep this share of V's entries; None = all")

  RETIRED: ClassVar[dict] = {'alpha_min': (0.05, _ALPHA_FIXED), 'alpha_max': (0.95, _ALPHA_FIXED)}

  def __post_init__(self):
    check, finite = config_lib.check, config_lib.finite
    config_lib.positive('zgr.', self, 'pool_size', 'refresh', 'trace_probes')
    check(0.0 <= self.alpha <= 1.0, f'zgr.alpha must be in [0, 1], got {self.alpha}')
    check(finite(self.beta) and self.beta > 0, f'zgr.beta must be > 0, got {self.beta}')
    check(finite(self.probe_v) and self.probe_v > 0,
          f'zgr.probe_v must be > 0, got {self.probe_v}')
    check(finite(self.lr_v) and self.lr_v >= 0, f'zgr.lr_v must be >= 0, got {self.lr_v}')
    check(0.0 <= self.ema < 1.0, f'zgr.ema must be in [0, 1), got {self.ema}')
    check(finite(self.curvature_cap) and self.curvature_cap >= 0,
          f'zgr.curvature_cap must be >= 0, got {self.curvature_cap}')
    check(finite(self.trace_cap) and self.trace_cap >= 0,
          f'zgr.trace_cap must be >= 0, got {self.trace_cap}')
    check(self.line_search >= 0, f'zgr.line_search must be >= 0, got {self.line_search}')
    check(self.guidance_format in GUIDANCE_FORMATS,
          f'zgr.guidance_format must be one of {", ".join(GUIDANCE_FORMATS)}, got '
          f'{self.guidance_format!r}')
    check(self.guidance_format != 'adaptive' or self.guidance_budget_bytes > 0,
          'zgr.guidance_format=adaptive needs zgr.guidance_budget_bytes > 0')
    self.codec('f32')  # checks guidance_block and guidance_topk

  def codec(self, fmt: str) -> codec_lib.LeafCodec:
    return codec_lib.LeafCodec(fmt, self.guidance_block, self.guidance_topk)

  @property
  def line_trials(self) -> int:
    """The line search's trials: none without a step along V to search (lr_v = 0)."""
    return self.line_search if self.lr_v > 0 else 0

  @property
  def allocates(self) -> bool:
    """One format per leaf and round under a byte budget ('adaptive' or 'link')."""
    return self.guidance_format in codec_lib.ALLOCATIONS


class Measured(NamedTuple):
  """The cloud's measurements that set a round's rates (float32 scalars, 0: not measured)."""
  tau_sq: jax.Array             # the variance of its mean gradient over the public batches
  curvature: jax.Array          # L_V along its direction (zgr.curvature_cap)
  trace: jax.Array              # Hutchinson's tr H (zgr.trace_cap)
  line_step: jax.Array          # the step its line search accepted (zgr.line_search)

  @classmethod
  def of(cls, stats: dict) -> 'Measured':
    """From the cloud step's stats (cloud/bp.py)."""
    return cls(*(jnp.asarray(stats[k], jnp.float32)
                 for k in ('variance', 'curvature', 'trace', 'line_step')))

  @classmethod
  def none(cls) -> 'Measured':
    return cls(*(jnp.float32(0) for _ in cls._fields))


class Mixing(NamedTuple):
  """What the edge has learnt for the rates: the pooled private-gradient estimates and the
  cloud's measurements of the newest direction in the pool."""
  grad_sq: mixing.Pooled        # |grad|^2
  proj_sq: mixing.Pooled        # |V^T grad|^2
  measured: Measured
  line_first: jax.Array         # the first line-search step (plain_share's reference)

  @classmethod
  def empty(cls) -> 'Mixing':
    """Before any round: nothing estimated or measured."""
    return cls(mixing.Pooled.empty(), mixing.Pooled.empty(), Measured.none(), jnp.float32(0))


class Pending(NamedTuple):
  """cloud.lag = 1: the direction the cloud computed in the last refresh, pushed in the next."""
  direction: Any                # the trainable tree's structure, float32
  measured: Measured
  ready: jax.Array              # bool: a direction is there (False before the first refresh)


class Downlink(NamedTuple):
  """The record of V's coding for the clients: each leaf's format (an index into codec.FORMATS)
  and |V' - V|^2 / |V|^2."""
  formats: Any
  rel_error: jax.Array


class ZGRState(NamedTuple):
  """cooperllm's own state (ServerState.extra)."""
  pool: pool_lib.Pool           # the last m cloud directions
  cloud: Any                    # the cloud step's own state (its AdamW's in finetune mode)
  guidance: guided.Guidance     # the last round's (an empty basis before the first)
  downlink: Downlink
  mixing: Mixing
  pending: Optional[Pending]    # None without cloud.lag
  zo: Any = ()                  # the wrapped FedMeZO's own state (OnScalarProtocol)


@dataclasses.dataclass
class CloudGuidance:
  """ZGR's cloud tier for a scalar protocol `zo`: see the module docstring. `public` holds the
  cloud's tokenized public examples {input_ids, attention_mask, labels} (client_data.public_set).
  link_budget (zgr.guidance_format='link'): sampled clients -> the round's byte budget for V,
  from the run's simulated links (attach_clock). local_steps: each client's steps per round (the
  distance the V step travels in a round, which zgr.line_search checks)."""
  zo: Any
  zgr: ZGR
  cloud: config_lib.Cloud
  public: dict
  local_steps: int = 1
  link_budget: Optional[Callable] = None

  def __post_init__(self):
    if self.public is None or not len(self.public.get('labels', ())):
      raise ConfigError('cooperllm needs public examples for the cloud (public_fraction > 0)')
    if self.cloud.devices and self.zo.mesh is not None:
      raise ConfigError(f'cloud.devices={self.cloud.devices} gives the cloud devices of its own, '
                        'but the run has a mesh (mesh.*), whose data/model axes the cloud uses: '
                        'set one of the two')
    self._client_device = self._place()
    z = self.zgr
    # The line search's first trial is the round's V displacement at the largest rate, lr_v per
    # step over local_steps steps (at full weight, h = V^T grad taken as the public gradient's);
    # with lr_v = 0 there is no V step and no search (its start is then unused).
    step = dataclasses.replace(self.cloud.step, curvature=z.curvature_cap > 0,
                               trace_probes=z.trace_probes if z.trace_cap > 0 else 0,
                               line_trials=z.line_trials,
                               line_start=(z.lr_v or 1.0) * self.local_steps)
    self._cloud = cloud_bp.make_cloud_step(make_loss(self.zo.model), self.zo.subset, step,
                                           mesh=self.cloud_mesh,
                                           model=self.zo.model)
    self._orthonormalize = jax.jit(pool_lib.orthonormalize)
    self._push = jax.jit(pool_lib.push)
    self._estimate = jax.jit(mixing.from_uplinks, static_argnames='distribution')

  def _place(self):
    """The clients' device (None: the default one, or the run's mesh) and the cloud's mesh
    (`cloud_mesh`: the run's mesh, or None). With cloud.devices=n the cloud gets the last n devices
    as its own mesh and the clients device 0, so the two tiers overlap for real."""
    self.cloud_mesh = self.zo.mesh
    n = self.cloud.devices
    if not n:
      return None
    devices = jax.devices()
    if n >= len(devices):
      raise ConfigError(f'cloud.devices={n} leaves no device for the clients '
                        f'({len(devices)} devices)')
    self.cloud_mesh = make_mesh(data=n, model=1, devices=devices[-n:])
    return devices[0]

  @property
  def costs(self) -> GuidanceCosts:
    fmt = 'f32' if self.zgr.allocates else self.zgr.guidance_format
    # A Hessian-vector product on one batch costs about two of its gradients, a forward pass a
    # third of one; the line search runs at most line_trials of them (counted as all).
    z = self.zgr
    hvp = 2 * self.cloud.batch_size * ((z.curvature_cap > 0) + (z.trace_cap > 0) * z.trace_probes)
    line = -(-z.line_trials * self.cloud.batches * self.cloud.batch_size // (1 + BACKWARD_FACTOR))
    return GuidanceCosts(pool_size=self.zgr.pool_size, codec=self.zgr.codec(fmt),
                         cloud_examples=self.cloud.batches * self.cloud.batch_size + hvp + line,
                         cloud_adamw=self.cloud.mode == 'finetune', cloud_lag=self.cloud.lag,
                         refresh=self.zgr.refresh)

  # -- state ---------------------------------------------------------------------------------
  def init(self, trainable) -> ZGRState:
    """The state before round 1 for the global weights `trainable`. The guidance starts with an
    empty basis (plain ZO directions) and every entry exists from the start, so the state's
    structure (checkpoints, memory analysis) never changes."""
    m = self.zgr.pool_size
    pool = pool_lib.empty_pool(trainable, m)
    _, downlink = self._downlink(pool.directions, 0)
    pending = None
    if self.cloud.lag:
      pending = Pending(jax.tree.map(jnp.zeros_like, trainable), Measured.none(), jnp.bool_(False))
    return ZGRState(pool, self._cloud.init(trainable),
                    self._guidance(pool.directions, jnp.zeros(m), self.zgr.alpha), downlink,
                    Mixing.empty(), pending)

  def _cloud_direction(self, cloud_state, server: ServerState, round_index):
    """(cloud state, direction, Measured): the cloud on this round's public batches at the
    current global model (dispatched asynchronously), its outputs on the clients' devices."""
    batches = client_data.public_batches(self.public, self.cloud.batches, self.cloud.batch_size,
                                         self.zo.seed, round_index)
    trainable, frozen = server.trainable, dequantize_tree(server.frozen)
    # The round donates the global weights: on the devices it shares with the clients (one device
    # or the run's mesh) the cloud reads its own copy; on its own, placing copies them there.
    if self._client_device is None:
      trainable = jax.tree.map(jnp.copy, trainable)
    trainable, frozen, batches = self._cloud.place(trainable, frozen, batches)
    key = keys_lib.leaf_key(keys_lib.address_key(self.zo.seed,
                                                 (round_index, SHARED, SHARED, SHARED)),
                            TRACE_PATH)
    cloud_state, direction, stats = self._cloud.step(cloud_state, trainable, frozen, batches, key)
    measured = Measured.of(stats)
    if self._client_device is not None:
      direction, measured = jax.device_put((direction, measured), self._client_device)
    return cloud_state, direction, measured

  def lr_v(self, measured: Measured) -> jax.Array:
    """The rate of the step along V: zgr.lr_v, capped at zgr.curvature_cap / L_V where the cloud
    measured a positive curvature L_V along its direction (a gradient step along a direction of
    curvature L is stable below 2 / L and best at 1 / L in the quadratic model), and at the line
    search's accepted step per local step (zgr.line_search; 0 = not measured)."""
    z = self.zgr
    curvature = measured.curvature
    line = measured.line_step / self.local_steps
    capped = (z.curvature_cap > 0) & (curvature > 0)
    cap = z.curvature_cap / jnp.where(capped, curvature, 1.0)
    rate = jnp.where(capped, jnp.minimum(z.lr_v, cap), z.lr_v)
    return jnp.where(line > 0, jnp.minimum(rate, line), rate).astype(jnp.float32)

  def plain_share(self, mix: Mixing) -> jax.Array:
    """The plain step's rate as a share of lr: 1, or zgr.trace_cap / (lr tr H) where that is
    smaller and the cloud measured a positive tr H (MeZO's step -lr (v . g) v changes the loss by
    -lr |g|^2 + lr^2 (|g|^2 tr H + 2 g^T H g) / 2 in expectation: best near lr = 1 / tr H); with
    zgr.line_search also at most the line search's step over its first one (the sharpening since
    the run began, where lr was tuned)."""
    z, trace = self.zgr, mix.measured.trace
    capped = (z.trace_cap > 0) & (trace > 0)
    share = z.trace_cap / (self.zo.lr * jnp.where(capped, trace, 1.0))
    share = jnp.where(capped, jnp.minimum(1.0, share), 1.0)
    first, line = mix.line_first, mix.measured.line_step
    sharpening = jnp.where((first > 0) & (line > 0), line / jnp.where(first > 0, first, 1.0), 1.0)
    return jnp.minimum(share, sharpening).astype(jnp.float32)

  def _guidance(self, basis, valid, alpha, weight=1.0,
                mix: Optional[Mixing] = None) -> guided.Guidance:
    """The round's Guidance; the step along V runs at weight x lr_v, the plain one at
    plain_share x lr, from what `mix` measured (nothing: the configured rates); both are relative
    to the plain rate, so the divergence guard's halving of lr halves both."""
    z, mix = self.zgr, mix or Mixing.empty()
    return guided.make_guidance(
        basis, valid, alpha, z.beta, z.probe_v,
        guided.step_ratio(weight * self.lr_v(mix.measured), self.zo.lr), self.plain_share(mix))

  def _weights(self, mix: Mixing, valid, clients: int):
    """(alpha, weight on the step along V) for this round: the weight fixed at 1, or from the
    pooled estimates (0 before the first)."""
    z = self.zgr
    if not z.adaptive:
      return jnp.float32(z.alpha), jnp.float32(1.0)
    proj_sq, _ = mixing.pooled(mix.proj_sq)
    grad_sq, _ = mixing.pooled(mix.grad_sq)
    curvature = mix.measured.curvature
    measured = (z.curvature_cap > 0) & (curvature > 0)
    rate_curvature = jnp.where(measured, self.lr_v(mix.measured) * curvature, 1.0)
    weight, _ = mixing.adaptive_mixing(proj_sq, grad_sq, jnp.maximum(valid.sum(), 1.0),
                                       self.zo.est.probes * clients, z.alpha, z.probe_v,
                                       rate_curvature)
    return jnp.float32(z.alpha), jnp.where(mix.proj_sq.w > 0, weight, 0.0)

  def refreshes(self, round_index: int) -> bool:
    """Whether the cloud computes a new direction in this round."""
    return (round_index - 1) % self.zgr.refresh == 0

  def before_round(self, zgr: ZGRState, server: ServerState, clients,
                   round_index: int) -> ZGRState:
    """The state with this round's guidance: a new cloud direction every `refresh` rounds (with
    cloud.lag, the one computed in the refresh before, if any)."""
    if not self.refreshes(round_index):
      basis, valid, mix = zgr.guidance.basis, zgr.guidance.valid, zgr.mixing
    else:
      cloud, direction, measured = self._cloud_direction(zgr.cloud, server, round_index)
      if zgr.pending is None:
        pool, pushed, pending = self._push(zgr.pool, direction), jnp.bool_(True), None
      else:   # push the last refresh's direction, if there was one; keep this one for the next
        last, pushed = zgr.pending, zgr.pending.ready
        pool = jax.tree.map(lambda a, b: jnp.where(pushed, a, b),
                            self._push(zgr.pool, last.direction), zgr.pool)
        measured, pending = last.measured, Pending(direction, measured, jnp.bool_(True))
      basis, valid = self._orthonormalize(pool)
      basis, downlink = self._downlink(basis, round_index, clients)
      first = zgr.mixing.line_first
      mix = zgr.mixing._replace(
          measured=Measured(*(jnp.where(pushed, new, old)
                              for new, old in zip(measured, zgr.mixing.measured))),
          line_first=jnp.where(pushed & ~(first > 0), measured.line_step, first))
      zgr = zgr._replace(pool=pool, cloud=cloud, downlink=downlink, pending=pending)
    guidance = self._guidance(basis, valid, *self._weights(mix, valid, len(clients)), mix=mix)
    return zgr._replace(guidance=guidance, mixing=mix)

  def after_round(self, zgr: ZGRState, result: RoundResult) -> tuple[ZGRState, RoundResult]:
    """What the edge learns from the round's scalars, and the round's result with the guidance's
    bytes and metrics."""
    mix, metrics = self._update_mixing(zgr, result.uplink, result.client_weights)
    guidance_bytes, downlink_metrics = self._account_guidance(zgr)
    return zgr._replace(mixing=mix), dataclasses.replace(
        result, guidance_bytes=guidance_bytes,
        broadcast_bytes=result.broadcast_bytes + guidance_bytes,
        metrics={**result.metrics, **metrics, **downlink_metrics})

  # -- the guidance downlink -----------------------------------------------------------------
  def _budget(self, basis, clients) -> int:
    """The round's byte budget for V: given ('adaptive') or from the sampled clients' links
    ('link'; before any round, room for all of V in float32)."""
    z = self.zgr
    if z.guidance_format == 'adaptive':
      return z.guidance_budget_bytes
    if clients is None:
      return codec_lib.tree_nbytes(basis, z.codec('f32'))
    if self.link_budget is None:
      raise ConfigError("zgr.guidance_format='link' takes its byte budget from the run's "
                        'simulated links: attach a clock first (train_and_evaluate does)')
    # Below the coarsest codes the link cannot hide V at all: send those (the round waits).
    floor = sum(min(z.codec(f).nbytes(x.shape) for f in codec_lib.FORMATS)
                for x in jax.tree.leaves(basis))
    return max(int(self.link_budget(clients)), floor)

  def _downlink(self, basis, round_index, clients=None):
    """(V as the clients receive it, record): V coded and decoded leaf by leaf; the record holds
    each leaf's format (index into codec.FORMATS) and |V' - V|^2 / |V|^2."""
    z = self.zgr
    if z.allocates:
      codecs = codec_lib.allocate(basis, self._budget(basis, clients), block=z.guidance_block,
                                  topk=z.guidance_topk).codecs
    else:
      codecs = z.codec(z.guidance_format)
    key = keys_lib.leaf_key(keys_lib.address_key(self.zo.seed,
                                                 (round_index, SHARED, SHARED, SHARED)),
                            CODEC_PATH)
    sent = codec_lib.roundtrip_tree(basis, codecs, key)
    diff = jax.tree.map(jnp.subtract, sent, basis)
    norm = tree_dot(basis, basis)
    formats = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.int32(codec_lib.FORMATS.index(codec_lib.codec_of(codecs, p).fmt)), basis)
    rel_error = jnp.where(norm > 0, tree_dot(diff, diff) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return sent, Downlink(formats, rel_error)

  def _account_guidance(self, zgr: ZGRState) -> tuple[int, dict]:
    """(bytes, metrics) of the round's guidance. Every sampled client receives it (and one
    catching up on this round needs it too): the codec's exact wire bytes of V, alpha, and with an
    allocating format one format byte per leaf."""
    formats = {path_str(p): codec_lib.FORMATS[int(i)]
               for p, i in jax.tree_util.tree_flatten_with_path(zgr.downlink.formats)[0]}
    codecs = {name: self.zgr.codec(fmt) for name, fmt in formats.items()}
    guidance = codec_lib.tree_nbytes(zgr.guidance.basis, codecs) + SCALAR_BYTES
    metrics = {}
    if self.zgr.allocates:
      guidance += len(codecs)
      metrics['guidance_formats'] = formats
    metrics['guidance_rel_error'] = float(zgr.downlink.rel_error)
    return guidance, metrics

  def _update_mixing(self, zgr: ZGRState, uplink, counts) -> tuple[Mixing, dict]:
    """(mixing, metrics): the round's estimates of the private gradient's |grad|^2 and
    |V^T grad|^2 (zoo/mixing.py) pooled into the running ones, and what is logged with the round.
    counts: the weights of the uploads the edge used (a round none arrived in tells nothing)."""
    guide, mix = zgr.guidance, zgr.mixing
    metrics = dict(alpha=float(guide.alpha), basis_rank=int(guide.valid.sum()),
                   cloud_step_v=float(guide.step_v))
    if self.zgr.curvature_cap > 0 or self.zgr.line_trials:
      metrics.update(cloud_curvature=float(mix.measured.curvature),
                     cloud_line_step=float(mix.measured.line_step),
                     lr_v=float(self.lr_v(mix.measured)))
    if self.zgr.trace_cap > 0 or self.zgr.line_trials:
      metrics.update(cloud_trace=float(mix.measured.trace), plain_share=float(guide.step_plain))
    # Which metrics a round logs depends on this on the host, so a jnp select would not spare it.
    if not np.any(counts > 0) or not float(guide.valid.sum()):
      return mix, metrics
    est = self._estimate(jax.tree.map(jnp.asarray, uplink), jnp.asarray(counts, jnp.float32),
                         guide, self.zo.seed, distribution=self.zo.est.distribution)
    decay = jnp.float32(self.zgr.ema)
    w_proj, w_grad = mixing.pooling_weights(est, mixing.pooled(mix.proj_sq)[0])
    grad_sq = max(float(est.grad_sq), 1e-30)
    metrics.update(
        grad_sq=float(est.grad_sq), grad_sq_se=float(est.grad_sq_se),
        proj_sq=float(est.proj_sq), proj_sq_se=float(est.proj_sq_se),
        proj_sq_weight=float(w_proj), grad_sq_weight=float(w_grad),
        cloud_share=float(np.clip(float(est.proj_sq) / grad_sq, 0.0, 1.0)),
        cloud_tau_sq=float(mix.measured.tau_sq))
    return mix._replace(
        grad_sq=mixing.accumulate(mix.grad_sq, est.grad_sq, est.grad_sq_se, w_grad, decay),
        proj_sq=mixing.accumulate(mix.proj_sq, est.proj_sq, est.proj_sq_se, w_proj, decay)), metrics


@register('cooperllm', config=ZGR, section='zgr')
@dataclasses.dataclass
class CooperLLM(OnScalarProtocol, Deployable):
  """FedMeZO's scalar protocol whose probes the cloud's guidance steers (ZGR)."""
  guidance: Optional[CloudGuidance] = None

  replayable: ClassVar[bool] = True

  @classmethod
  def from_config(cls, cfg: config_lib.RunConfig, model, public=None):
    zo = FedMeZO(**FedMeZO.options(cfg, model))
    return cls(zo, CloudGuidance(zo, cfg.zgr, cfg.cloud, public, cfg.local_steps))

  @property
  def costs(self) -> Costs:
    return dataclasses.replace(self.zo.costs, guidance=self.guidance.costs)

  def attach_clock(self, clock) -> None:
    """DTC from the simulated links (zgr.guidance_format='link') needs the clock's budget."""
    if self.guidance.zgr.guidance_format == 'link':
      self.guidance.link_budget = clock.guidance_budget

  def init(self, params) -> ServerState:
    inner = self.zo.init(params)
    return self.zo.on_mesh(inner._replace(
        extra=self.guidance.init(inner.trainable)._replace(zo=inner.extra)))

  def guide(self, state: ServerState) -> guided.Guidance:
    return state.extra.guidance

  def client_memory(self, state, batch_shapes) -> dict:
    return self.zo.client_memory(self.zo_state(state), batch_shapes, state.extra.guidance)

  def prepare(self, state, clients, counts, round_index):
    """The cloud's direction and the round's guidance, then FedMeZO's messages carrying it."""
    zgr = self.guidance.before_round(state.extra, state, clients, round_index)
    inner, messages = self.zo.prepare(self.zo_state(state._replace(extra=zgr)), clients, counts,
                                      round_index, guide=zgr.guidance)
    return self.with_zo(state._replace(extra=zgr), inner), messages

  def run_clients(self, state, messages, batches):
    return self.zo.run_clients(self.zo_state(state), messages, batches)

  def apply(self, state, messages, replies):
    """FedMeZO's edge under the round's guidance, then what the edge learns from the scalars."""
    inner, result = self.zo.apply(self.zo_state(state), messages, replies)
    zgr, result = self.guidance.after_round(state.extra._replace(zo=inner.extra), result)
    return (self.zo.on_mesh(inner._replace(extra=zgr)),
            dataclasses.replace(result, cloud_ran=self.guidance.refreshes(messages.round_index)))

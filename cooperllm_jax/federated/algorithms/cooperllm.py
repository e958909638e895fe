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

Quantized guidance: the clients and the edge's replay both use the decoded V, so replay stays exact.
The decoded V is not exactly orthonormal (each entry is off by an unbiased rounding error, about
guidance_rel_error of |V|^2 in all), and we use it as it is: the estimator's covariance becomes
alpha I + (1 - alpha) (d/m) V'V'^T for the V' actually sent, still replayable, and the mixing
estimates (which assume V'^T V' = I) are off by that relative error. Re-orthonormalizing on the
clients would cost a QR per client and round, and the edge's replay would then be exact only if
every client's QR rounded exactly like the edge's.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.cloud import bp as cloud_bp
from cooperllm_jax.cloud import pool as pool_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.algorithms.fedmezo import FedMeZO
from cooperllm_jax.federated.algorithms.scalar import OnScalarProtocol
from cooperllm_jax.federated.api import SCALAR_BYTES, Costs, GuidanceCosts, RoundResult
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
# The cloud's measurements that set a round's rates: state name -> the cloud step's stat.
MEASURED = {'tau_sq': 'variance', 'curvature': 'curvature', 'trace': 'trace',
            'line_step': 'line_step'}


@dataclasses.dataclass
class CloudGuidance:
  """ZGR's cloud tier for a scalar protocol `zo`: see the module docstring. `public` holds the
  cloud's tokenized public examples {input_ids, attention_mask, labels} (client_data.public_set).
  link_budget (zgr.guidance_format='link'): sampled clients -> the round's byte budget for V,
  from the run's simulated links (attach_clock). local_steps: each client's steps per round (the
  distance the V step travels in a round, which zgr.line_search checks)."""
  zo: Any
  zgr: config_lib.ZGR
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
  def init(self, state: dict) -> dict:
    """The guidance entries of the run state (pool, cloud, guidance, downlink, mixing)."""
    trainable, m = state['trainable'], self.zgr.pool_size
    state['pool'] = pool_lib.empty_pool(trainable, m)
    state['cloud'] = self._cloud.init(trainable)
    # An empty basis (plain ZO directions) until the cloud's first direction arrives; present from
    # the start so the state's structure (checkpoints, memory analysis) never changes.
    state['guidance'] = self._guidance(state['pool'].directions, jnp.zeros(m), self.zgr.alpha)
    _, state['downlink'] = self._downlink(state['pool'].directions, 0)
    empty = {'w': jnp.float32(0), 'x': jnp.float32(0), 'v': jnp.float32(0)}
    state['mixing'] = {'grad_sq': empty, 'proj_sq': empty, **self._unmeasured()}
    if self.cloud.lag:
      state['pending'] = {'direction': jax.tree.map(jnp.zeros_like, trainable),
                          **self._on_host(), 'ready': jnp.bool_(False)}
    return state

  def _cloud_direction(self, state, round_index):
    """Runs the cloud on this round's public batches at the current global model (async)."""
    batches = client_data.public_batches(self.public, self.cloud.batches, self.cloud.batch_size,
                                         self.zo.seed, round_index)
    trainable, frozen = state['trainable'], dequantize_tree(state['frozen'])
    # The round donates the global weights: on the devices it shares with the clients (one device
    # or the run's mesh) the cloud reads its own copy; on its own, placing copies them there.
    if self._client_device is None:
      trainable = jax.tree.map(jnp.copy, trainable)
    trainable, frozen, batches = self._cloud.place(trainable, frozen, batches)
    key = keys_lib.leaf_key(keys_lib.address_key(self.zo.seed,
                                                 (round_index, SHARED, SHARED, SHARED)),
                            TRACE_PATH)
    cloud_state, direction, stats = self._cloud.step(state['cloud'], trainable, frozen, batches,
                                                     key)
    if self._client_device is not None:
      direction = jax.device_put(direction, self._client_device)
    return cloud_state, direction, stats

  def lr_v(self, measured) -> jax.Array:
    """The rate of the step along V: zgr.lr_v, capped at zgr.curvature_cap / L_V where the cloud
    measured a positive curvature L_V along its direction (a gradient step along a direction of
    curvature L is stable below 2 / L and best at 1 / L in the quadratic model), and at the line
    search's accepted step per local step (zgr.line_search; 0 = not measured)."""
    z = self.zgr
    curvature = jnp.asarray(measured['curvature'], jnp.float32)
    line = jnp.asarray(measured['line_step'], jnp.float32) / self.local_steps
    capped = (z.curvature_cap > 0) & (curvature > 0)
    cap = z.curvature_cap / jnp.where(capped, curvature, 1.0)
    rate = jnp.where(capped, jnp.minimum(z.lr_v, cap), z.lr_v)
    return jnp.where(line > 0, jnp.minimum(rate, line), rate).astype(jnp.float32)

  def plain_share(self, measured) -> jax.Array:
    """The plain step's rate as a share of lr: 1, or zgr.trace_cap / (lr tr H) where that is
    smaller and the cloud measured a positive tr H (MeZO's step -lr (v . g) v changes the loss by
    -lr |g|^2 + lr^2 (|g|^2 tr H + 2 g^T H g) / 2 in expectation: best near lr = 1 / tr H); with
    zgr.line_search also at most the line search's step over its first one (the sharpening since
    the run began, where lr was tuned)."""
    z, trace = self.zgr, jnp.asarray(measured['trace'], jnp.float32)
    capped = (z.trace_cap > 0) & (trace > 0)
    share = z.trace_cap / (self.zo.lr * jnp.where(capped, trace, 1.0))
    share = jnp.where(capped, jnp.minimum(1.0, share), 1.0)
    first, line = measured['line_first'], measured['line_step']
    sharpening = jnp.where((first > 0) & (line > 0), line / jnp.where(first > 0, first, 1.0), 1.0)
    return jnp.minimum(share, sharpening).astype(jnp.float32)

  @staticmethod
  def _from_cloud(stats) -> dict:
    """The MEASURED entries of the cloud step's stats, under their state names (on device)."""
    return {k: stats[s] for k, s in MEASURED.items()}

  @staticmethod
  def _on_host(measured=None) -> dict:
    """MEASURED entries as float32 scalars fetched to the host (zeros before the first): the
    edge's decision must not wait on device values it replays."""
    return {k: jnp.float32(0 if measured is None else float(measured[k])) for k in MEASURED}

  def _unmeasured(self) -> dict:
    """The mixing state's cloud measurements before the first: zeros (nothing measured)."""
    return dict(self._on_host(), line_first=jnp.float32(0))

  def _guidance(self, basis, valid, alpha, weight=1.0, measured=None) -> guided.Guidance:
    """The round's Guidance; the step along V runs at weight x lr_v(measured), the plain one at
    plain_share(measured) x lr (both relative to the plain rate, so the divergence guard's halving
    of lr halves both)."""
    z, measured = self.zgr, measured or self._unmeasured()
    return guided.make_guidance(
        basis, valid, alpha, z.beta, z.probe_v,
        guided.step_ratio(weight * self.lr_v(measured), self.zo.lr),
        self.plain_share(measured))

  def _mixing(self, state, valid, clients: int):
    """(alpha, weight on the step along V) for this round: the weight fixed at 1, or from the
    pooled estimates (0 before the first)."""
    z = self.zgr
    if not z.adaptive:
      return jnp.float32(z.alpha), jnp.float32(1.0)
    proj_sq, _ = mixing.pooled(state['mixing']['proj_sq'])
    grad_sq, _ = mixing.pooled(state['mixing']['grad_sq'])
    curvature = state['mixing']['curvature']
    measured = (z.curvature_cap > 0) & (curvature > 0)
    rate_curvature = jnp.where(measured, self.lr_v(state['mixing']) * curvature, 1.0)
    weight, _ = mixing.adaptive_mixing(proj_sq, grad_sq, jnp.maximum(valid.sum(), 1.0),
                                       self.zo.est.probes * clients, z.alpha, z.probe_v,
                                       rate_curvature)
    seen = state['mixing']['proj_sq']['w'] > 0
    return jnp.float32(z.alpha), jnp.where(seen, weight, 0.0)

  def refreshes(self, round_index: int) -> bool:
    """Whether the cloud computes a new direction in this round."""
    return (round_index - 1) % self.zgr.refresh == 0

  def before_round(self, state, clients, round_index) -> dict:
    """The state with this round's guidance: a new cloud direction every `refresh` rounds."""
    state = dict(state)
    refresh = self.refreshes(round_index)
    measured = None   # the cloud's measurements of the direction pushed
    if refresh:
      if self.cloud.lag:
        pending = state['pending']
        state['cloud'], direction, stats = self._cloud_direction(state, round_index)
        if bool(pending['ready']):
          state['pool'] = self._push(state['pool'], pending['direction'])
          measured = self._on_host(pending)
        state['pending'] = {'direction': direction, **self._from_cloud(stats),
                            'ready': jnp.bool_(True)}
      else:
        state['cloud'], direction, stats = self._cloud_direction(state, round_index)
        state['pool'] = self._push(state['pool'], direction)
        measured = self._on_host(self._from_cloud(stats))
      basis, valid = self._orthonormalize(state['pool'])
      basis, state['downlink'] = self._downlink(basis, round_index, clients)
    else:
      basis, valid = state['guidance'].basis, state['guidance'].valid
    if measured is not None:
      first = state['mixing']['line_first']
      state['mixing'] = dict(state['mixing'], **measured,
                             line_first=jnp.where(first > 0, first, measured['line_step']))
    state['guidance'] = self._guidance(basis, valid, *self._mixing(state, valid, len(clients)),
                                       measured=state['mixing'])
    return state

  def after_round(self, state, result: RoundResult) -> None:
    self._update_mixing(state, result, result.client_weights)
    self._account_guidance(state, result)

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
    return sent, {'formats': formats, 'rel_error': rel_error}

  def _account_guidance(self, state, result: RoundResult):
    """Every sampled client receives the round's guidance (and one catching up on this round
    needs it too): the codec's exact wire bytes of V, alpha, and with an allocating format one
    format byte per leaf."""
    formats = {path_str(p): codec_lib.FORMATS[int(i)]
               for p, i in jax.tree_util.tree_flatten_with_path(state['downlink']['formats'])[0]}
    codecs = {name: self.zgr.codec(fmt) for name, fmt in formats.items()}
    guidance = codec_lib.tree_nbytes(state['guidance'].basis, codecs) + SCALAR_BYTES
    if self.zgr.allocates:
      guidance += len(codecs)
      result.metrics['guidance_formats'] = formats
    result.guidance_bytes = guidance
    result.broadcast_bytes += guidance
    result.metrics['guidance_rel_error'] = float(state['downlink']['rel_error'])

  def _update_mixing(self, state, result: RoundResult, counts):
    """Pools the round's estimates of the private gradient's |grad|^2 and |V^T grad|^2
    (zoo/mixing.py) into the running ones, logged with the round. counts: the weights of the
    uploads the edge used (a round none arrived in tells nothing)."""
    guide = state['guidance']
    result.metrics.update(alpha=float(guide.alpha), basis_rank=int(guide.valid.sum()),
                          cloud_step_v=float(guide.step_v))
    if self.zgr.curvature_cap > 0 or self.zgr.line_trials:
      result.metrics.update(cloud_curvature=float(state['mixing']['curvature']),
                            cloud_line_step=float(state['mixing']['line_step']),
                            lr_v=float(self.lr_v(state['mixing'])))
    if self.zgr.trace_cap > 0 or self.zgr.line_trials:
      result.metrics.update(cloud_trace=float(state['mixing']['trace']),
                            plain_share=float(guide.step_plain))
    if not np.any(counts > 0) or not float(guide.valid.sum()):
      return
    est = self._estimate(jax.tree.map(jnp.asarray, result.uplink),
                         jnp.asarray(counts, jnp.float32), guide, self.zo.seed,
                         distribution=self.zo.est.distribution)
    mix, decay = state['mixing'], jnp.float32(self.zgr.ema)
    w_proj, w_grad = mixing.pooling_weights(est, mixing.pooled(mix['proj_sq'])[0])
    state['mixing'] = dict(
        mix, grad_sq=mixing.accumulate(mix['grad_sq'], est.grad_sq, est.grad_sq_se, w_grad, decay),
        proj_sq=mixing.accumulate(mix['proj_sq'], est.proj_sq, est.proj_sq_se, w_proj, decay))
    grad_sq = max(float(est.grad_sq), 1e-30)
    result.metrics.update(
        grad_sq=float(est.grad_sq), grad_sq_se=float(est.grad_sq_se),
        proj_sq=float(est.proj_sq), proj_sq_se=float(est.proj_sq_se),
        proj_sq_weight=float(w_proj), grad_sq_weight=float(w_grad),
        cloud_share=float(np.clip(float(est.proj_sq) / grad_sq, 0.0, 1.0)),
        cloud_tau_sq=float(mix['tau_sq']))


@register('cooperllm')
@dataclasses.dataclass
class CooperLLM(OnScalarProtocol):
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

  def init(self, params):
    return self.zo.on_mesh(self.guidance.init(self.zo.init(params)))

  def run_round(self, state, batches, counts, clients, round_index):
    state = self.guidance.before_round(state, clients, round_index)
    state, result = self.zo.run_round(state, batches, counts, clients, round_index)
    self.guidance.after_round(state, result)
    result.cloud_ran = self.guidance.refreshes(round_index)
    return self.zo.on_mesh(state), result

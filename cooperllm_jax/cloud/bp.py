"""The cloud's backprop on public data: a direction over the trainable leaves, and how noisy it is.

Each round the cloud gets the global trainable params and K public batches and returns a float32
direction with the trainable tree's structure (ZGR orthonormalizes the last m of them into the
clients' guidance basis), in one of two modes:

  gradient  the mean BP gradient of the public loss at the global params over the K batches;
  finetune  the cloud's copy starts at the global params and takes K AdamW steps (one per batch);
            it sends (global - after) / (K * lr), the mean per-step update in units of lr. For
            plain SGD that is exactly the mean of the K gradients it saw, so both modes are on a
            gradient's scale; AdamW's steps are normalized per coordinate (about 1 in size), so the
            finetune direction is a preconditioned, not a raw, gradient. The optimizer state is the
            cloud's own and carries over between rounds; the params restart from the global model.

Stats (float32 scalars): `loss`, the mean public loss of the K batches at the global params (in
finetune mode this costs K forward passes on top of the K training steps); `grad_sq_norm`,
|direction|^2; `variance`, tau^2 = sum_k |g_k - g_mean|^2 / (K (K - 1)), the trace variance of the
mean of the K per-batch (per-step, for finetune) gradients as an estimate of the expected gradient,
0 for K = 1. It feeds ZGR's mixing weight, which depends on |b|^2 + tau^2. The sum of squared
deviations is accumulated by Welford's update inside the scan over K, so no K gradients are
stacked and no large sums of squares cancel. `curvature` (with CloudConfig.curvature; else 0):
u^T H u for the unit direction u = direction / |direction|, H the Hessian of the public loss on
the first of the K batches at the global params (one forward-over-reverse Hessian-vector product,
about two gradients' cost): the curvature along the direction the clients step along, below
2 / curvature of which ZGR's step along V is stable (zgr.curvature_cap). It is measured at
every refresh because it grows as the model trains (BBC News, MiniLM LoRA: 0.15 at round 1, 247
by round 17; docs/zgr.md). `trace` (with CloudConfig.trace_probes = n > 0; else 0): Hutchinson's
estimate mean_i w_i^T H w_i of tr H on the same batch, w_i Rademacher over the trainable leaves
drawn from the step's `key` (n Hessian-vector products; unbiased, variance 2 sum_{j != k} H_jk^2 /
n): the plain ZO step's stable rate scales as 1 / tr H (E[(v . g)^2 v^T H v] = |g|^2 tr H +
2 g^T H g for v ~ N(0, I)), which the edge cannot see from central differences
(zgr.trace_cap). `line_step` (with CloudConfig.line_trials = J > 0; else 0): a backtracking
line search on the public loss along the direction over the distance the clients' step along V
will actually travel: the largest t in {line_start 2^-j, j < J} with

    f(theta - t d) <= f(theta) - t d.g / 2        (Armijo with c = 1/2; g the mean gradient),

on the same K batches (at most J forward passes over them, largest t first, stopping at the first
that passes; the smallest trial when none does). On a
quadratic with curvature L along d it accepts t <= |d|^2 / d^T H d = 1 / L for d = g: the step
that stops at the minimum along the line. Unlike `curvature` (one Hessian-vector product at
theta) it sees a wall anywhere within the distance travelled (zgr.line_search).

On a mesh the step is jitted with FSDP/tensor-parallel shardings from the model's logical axes
(cloud/sharding.py) for the params, the direction and the optimizer state, and the batches split
over 'data'; the numbers equal the single-device ones up to float reduction order.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cooperllm_jax.cloud.sharding import (LOGICAL_RULES, batch_sharding, spec_shardings,
                                          trainable_shardings)
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.tree_math import PyTree, tree_dot
from cooperllm_jax.zoo.spsa import loss_at
from cooperllm_jax.zoo.trainable import Subset

MODES = ('gradient', 'finetune')
BATCH_AXIS = 1   # batches are {name: [K, B, ...]}


@dataclasses.dataclass(frozen=True)
class CloudConfig:
  """What the cloud's BP round computes.

  Attributes:
    mode: 'gradient' (the direction is the mean of the K public batches' gradients) or
      'finetune' (K AdamW steps; the direction is (start - after) / (K learning_rate)).
    learning_rate: finetune only: the cloud's AdamW rate (also the direction's unit); finite
      and > 0.
    weight_decay: finetune only: AdamW's decoupled weight decay (>= 0).
    curvature: also measure the public loss's curvature along the direction (u^T H u on the
      first batch).
    trace_probes: > 0: also estimate tr H with this many Hutchinson probes.
    line_trials: > 0: also line-search the step along the direction (this many trials).
    line_start: the line search's first (largest) step, in units of direction (finite, > 0).
  """
  mode: str = 'gradient'
  learning_rate: float = 1e-3   # finetune only: the cloud's AdamW rate (also the direction's unit)
  weight_decay: float = 0.0     # finetune only: AdamW's decoupled weight decay
  curvature: bool = False       # also measure the public loss's curvature along the direction
  trace_probes: int = 0         # > 0: also estimate tr H with this many Hutchinson probes
  line_trials: int = 0          # > 0: also line-search the step along the direction (J trials)
  line_start: float = 1.0       # the line search's first (largest) step, in units of direction

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f'unknown cloud mode {self.mode!r}; choose one of {", ".join(MODES)}')
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ConfigError(f'cloud.learning_rate must be finite and > 0, got '
                        f'{self.learning_rate}')
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ConfigError(f'cloud weight_decay must be >= 0, got {self.weight_decay}')
    if self.trace_probes < 0:
      raise ConfigError(f'cloud trace_probes must be >= 0, got {self.trace_probes}')
    if self.line_trials < 0:
      raise ConfigError(f'cloud line_trials must be >= 0, got {self.line_trials}')
    if not (math.isfinite(self.line_start) and self.line_start > 0):
      raise ConfigError(f'cloud line_start must be finite and > 0, got {self.line_start}')


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


class _Welford(NamedTuple):
  """Running mean of gradient trees and the scalar sum of their squared deviations from it."""
  count: jax.Array
  mean: dict
  m2: jax.Array

  @classmethod
  def empty(cls, like):
    return cls(jnp.float32(0), jax.tree.map(jnp.zeros_like, like), jnp.float32(0))

  def push(self, g) -> '_Welford':
    count = self.count + 1
    delta = jax.tree.map(jnp.subtract, g, self.mean)
    mean = jax.tree.map(lambda m, d: m + d / count, self.mean, delta)
    return _Welford(count, mean, self.m2 + tree_dot(delta, jax.tree.map(jnp.subtract, g, mean)))

  def variance(self, k: int) -> jax.Array:
    """Trace variance of the mean of k samples."""
    return self.m2 / (k * (k - 1)) if k > 1 else jnp.float32(0)


class CloudStep:
  """The cloud's round: `init(trainable)` -> cloud_state, and
  `step(cloud_state, trainable, frozen, batches, key)` -> (cloud_state, direction, stats), jitted
  (key, a threefry key: the trace's Hutchinson probes; unused, and may be None, without
  trace_probes).

  cloud_state is the AdamW state (finetune) or () (gradient) and is donated. The cloud trains a
  float32 master copy of the trainable leaves (the forward pass sees them in their own dtype), so a
  round's small update is not rounded away in bf16. `place` puts inputs on the step's shardings
  once, so repeated calls do not reshard them.

  step's direction is a float32 tree shaped like `trainable` (on a mesh, sharded like it); stats
  are float32 scalars {'loss' (the public loss at the start), 'grad_sq_norm' (|direction|^2),
  'variance' (the trace variance of the K-batch mean gradient), 'curvature', 'trace',
  'line_step'} (0 where the config does not ask for them). `train(cloud_state, trainable, frozen,
  batches)` -> (cloud_state, trainable after K AdamW steps, in its own dtype) donates both.

  Args:
    loss_fn: loss_fn(params, batch, perturb) -> float32 scalar (make_loss(model)).
    subset: which weights train (the split of trainable and frozen).
    config: the CloudConfig.
    mesh: a mesh to shard the step on (its 'data' axis splits the batch axis); None: no mesh.
    model: the model whose specs' logical axes shard the params; required with a mesh.
    rules: the logical-axis rules mapping those axes onto the mesh.
  """

  def __init__(self, loss_fn: Callable, subset: Subset, config: CloudConfig,
               mesh: Optional[Mesh] = None, model: Any = None,
               rules: Sequence[tuple] = LOGICAL_RULES):
    if mesh is not None and model is None:
      raise ValueError('make_cloud_step needs the model to shard its params on a mesh')
    self.loss_fn, self.subset, self.config = loss_fn, subset, config
    self.mesh, self.model, self.rules = mesh, model, rules
    self.optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    self._plain = jax.jit(self._step, donate_argnums=0)
    # train(cloud_state, trainable, frozen, batches) -> (cloud_state, trainable); both donated.
    self.train = jax.jit(self._train, donate_argnums=(0, 1))
    self._on_mesh = {}   # input signature -> (jitted step, input shardings), which depend on shapes

  # ---- the pure step -------------------------------------------------------------------------

  def _loss(self, trainable, frozen):
    """loss(master, batch): the public loss at a float32 master copy of `trainable`."""
    def loss(master, batch):
      params = jax.tree.map(lambda m, x: m.astype(x.dtype), master, trainable)
      return loss_at(self.loss_fn, params, frozen, batch, None, 0.0, subset=self.subset)

    return loss

  def _finetune(self, cloud_state, trainable, frozen, batches):
    """(cloud_state, after, Welford of the K step gradients): K AdamW steps, one per batch, of a
    float32 master copy that starts at `trainable`."""
    grad = jax.grad(self._loss(trainable, frozen))

    def body(carry, batch):
      params, opt_state, acc = carry
      g = _f32(grad(params, batch))
      updates, opt_state = self.optimizer.update(g, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, acc.push(g)), None

    start = _f32(trainable)
    (after, cloud_state, acc), _ = jax.lax.scan(
        body, (start, cloud_state, _Welford.empty(start)), batches)
    return cloud_state, after, acc

  def _train(self, cloud_state, trainable, frozen, batches):
    """(cloud_state, trainable after K AdamW steps, in its own dtype): the cloud training a model
    of its own (the cloud_only and warm_start baselines); finetune mode only."""
    cloud_state, after, _ = self._finetune(cloud_state, trainable, frozen, batches)
    return cloud_state, jax.tree.map(lambda a, x: a.astype(x.dtype), after, trainable)

  def _step(self, cloud_state, trainable, frozen, batches, key_data):
    loss = self._loss(trainable, frozen)
    grad = jax.value_and_grad(loss)
    start = _f32(trainable)
    k = jax.tree.leaves(batches)[0].shape[0]

    if self.config.mode == 'gradient':
      def body(carry, batch):
        acc, total = carry
        value, g = grad(start, batch)
        return (acc.push(_f32(g)), total + value), None

      (acc, total), _ = jax.lax.scan(body, (_Welford.empty(start), jnp.float32(0)), batches)
      direction, start_loss = acc.mean, total / k
    else:
      cloud_state, after, acc = self._finetune(cloud_state, trainable, frozen, batches)
      scale = 1.0 / (k * self.config.learning_rate)
      direction = jax.tree.map(lambda s, a: (s - a) * scale, start, after)
      start_loss = jax.lax.map(lambda b: loss(start, b), batches).mean()

    grad_sq = tree_dot(direction, direction)
    stats = {'loss': start_loss, 'grad_sq_norm': grad_sq, 'variance': acc.variance(k),
             'curvature': (self._curvature(loss, start, direction, grad_sq, batches)
                           if self.config.curvature else jnp.float32(0)),
             'trace': (self._trace(loss, start, batches, key_data, self.config.trace_probes)
                       if self.config.trace_probes else jnp.float32(0)),
             'line_step': (self._line_step(loss, start, direction, tree_dot(direction, acc.mean),
                                           start_loss, batches)
                           if self.config.line_trials else jnp.float32(0))}
    return cloud_state, direction, stats

  def _line_step(self, loss, params, direction, slope, start_loss, batches):
    """The largest trial step t = line_start 2^-j (j < line_trials) with
    mean_k f_k(params - t direction) <= start_loss - t slope / 2, else the smallest trial. The
    trials run largest first and stop at the first accepted (usually the first or second)."""
    n, start = self.config.line_trials, jnp.float32(self.config.line_start)
    step_of = lambda j: start * jnp.exp2(-j.astype(jnp.float32))

    def accepted(j):
      t = step_of(j)
      moved = jax.tree.map(lambda p, d: p - t * d, params, direction)
      return jax.lax.map(lambda b: loss(moved, b), batches).mean() <= start_loss - 0.5 * t * slope

    def body(carry):
      j, _ = carry
      ok = accepted(j)
      return jnp.where(ok, j, j + 1), ok

    j, _ = jax.lax.while_loop(lambda c: (~c[1]) & (c[0] < n), body,
                              (jnp.int32(0), jnp.bool_(False)))
    return step_of(jnp.minimum(j, n - 1))

  @staticmethod
  def _curvature(loss, params, direction, grad_sq, batches):
    """u^T H u on the first batch, u = direction / |direction| (0 for a zero direction)."""
    scale = jnp.where(grad_sq > 0, jax.lax.rsqrt(jnp.where(grad_sq > 0, grad_sq, 1.0)), 0.0)
    u = jax.tree.map(lambda x: x * scale, direction)
    first = jax.tree.map(lambda x: x[0], batches)
    grad = jax.grad(lambda p: loss(p, first))
    _, hu = jax.jvp(grad, (params,), (u,))
    return tree_dot(u, _f32(hu))

  @staticmethod
  def _trace(loss, params, batches, key_data, n: int):
    """Hutchinson's mean_i w_i^T H w_i over n Rademacher w_i (from the key's data) on the first
    batch; the products run one after another, so memory is one HVP's."""
    key = jax.random.wrap_key_data(key_data, impl='threefry2x32')
    first = jax.tree.map(lambda x: x[0], batches)
    grad = jax.grad(lambda p: loss(p, first))
    leaves, treedef = jax.tree.flatten(params)

    def quad(k):
      w = treedef.unflatten([jax.random.rademacher(jax.random.fold_in(k, i), x.shape, jnp.float32)
                             for i, x in enumerate(leaves)])
      _, hw = jax.jvp(grad, (params,), (w,))
      return tree_dot(w, _f32(hw))

    return jax.lax.map(quad, jax.random.split(key, n)).mean()

  def _init(self, trainable):
    return self.optimizer.init(_f32(trainable)) if self.config.mode == 'finetune' else ()

  # ---- shardings -----------------------------------------------------------------------------

  def _state_shardings(self, trainable, trainable_sh):
    if self.config.mode != 'finetune':
      return ()
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return optax.tree_map_params(self.optimizer, lambda _, s: s,
                                 jax.eval_shape(self._init, trainable), trainable_sh,
                                 transform_non_params=lambda _: replicated)

  def shardings(self, trainable: PyTree, frozen: PyTree, batches: dict) -> tuple:
    """(cloud_state, trainable, frozen, batches) shardings on the mesh for these inputs."""
    data = self.mesh.shape['data']
    for name, x in batches.items():
      if x.shape[BATCH_AXIS] % data:
        raise ConfigError(f'public batch {name!r} has batch size {x.shape[BATCH_AXIS]}, not a '
                          f'multiple of the mesh data axis {data}')
    trainable_sh = trainable_shardings(self.model, trainable, self.mesh, self.rules)
    return (self._state_shardings(trainable, trainable_sh), trainable_sh,
            spec_shardings(self.model, frozen, self.mesh, self.rules),
            jax.tree.map(lambda x: batch_sharding(self.mesh, x.ndim, BATCH_AXIS), batches))

  # ---- public API ----------------------------------------------------------------------------

  def init(self, trainable: PyTree) -> PyTree:
    """The cloud's optimizer state for these trainable leaves (sharded on the mesh)."""
    if self.mesh is None:
      return jax.jit(self._init)(trainable)
    trainable_sh = trainable_shardings(self.model, trainable, self.mesh, self.rules)
    return jax.jit(self._init, in_shardings=(trainable_sh,),
                   out_shardings=self._state_shardings(trainable, trainable_sh))(
                       jax.device_put(trainable, trainable_sh))

  def place(self, trainable: PyTree, frozen: PyTree, batches: dict) -> tuple[PyTree, PyTree, dict]:
    """(trainable, frozen, batches) moved onto the step's shardings (no-op without a mesh)."""
    if self.mesh is None:
      return trainable, frozen, batches
    return tuple(jax.device_put(x, s) for x, s in
                 zip((trainable, frozen, batches), self.shardings(trainable, frozen, batches)[1:]))

  def step(self, cloud_state: PyTree, trainable: PyTree, frozen: PyTree,
           batches: dict, key: Optional[jax.Array] = None) -> tuple[PyTree, PyTree, dict]:
    """(cloud_state, direction, stats) for one round at the global weights (trainable, frozen);
    batches are {name: [K, B, ...]} (client_data.public_batches); cloud_state is donated; key
    draws the trace's probes (needed with trace_probes > 0)."""
    if self.config.trace_probes and key is None:
      raise ValueError('the cloud step estimates tr H (trace_probes > 0): pass a key')
    # As host data, so that every process can place it on a mesh spanning them all.
    key_data = None if key is None else np.asarray(jax.random.key_data(key))
    args = (cloud_state, trainable, frozen, batches, key_data)
    if self.mesh is None:
      return self._plain(*args)
    leaves, treedef = jax.tree.flatten(args)
    signature = (treedef, tuple((x.shape, x.dtype) for x in leaves))
    if signature not in self._on_mesh:
      self._on_mesh[signature] = self.jit_on_mesh(trainable, frozen, batches)
    jitted, in_sh = self._on_mesh[signature]
    # jit refuses arrays committed elsewhere; device_put is free for those already in place.
    return jitted(*jax.device_put(args, in_sh))

  def jit_on_mesh(self, trainable: PyTree, frozen: PyTree,
                  batches: dict) -> tuple[Callable, tuple]:
    """(the jitted program `step` runs on the mesh for arrays shaped like these, its input
    shardings): step(cloud_state, trainable, frozen, batches, key_data) -> (cloud_state,
    direction, stats), cloud_state donated. Public so it can be exported (jax.export) or
    AOT-compiled for an accelerator mesh."""
    in_sh = self.shardings(trainable, frozen, batches)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    stats_sh = {'loss': replicated, 'grad_sq_norm': replicated, 'variance': replicated,
                'curvature': replicated, 'trace': replicated, 'line_step': replicated}
    in_sh = in_sh + (replicated,)
    return jax.jit(self._step, in_shardings=in_sh, out_shardings=(in_sh[0], in_sh[1], stats_sh),
                   donate_argnums=0), in_sh


def make_cloud_step(loss_fn: Callable, subset: Subset, config: CloudConfig = CloudConfig(),
                    mesh: Optional[Mesh] = None, model: Any = None,
                    rules: Sequence[tuple] = LOGICAL_RULES) -> CloudStep:
  """The cloud's jitted BP round for `loss_fn = make_loss(model)` on the `subset` split; `model`
  (its specs' logical axes) is needed only with a mesh.

  Args:
    loss_fn: loss_fn(params, batch, perturb) -> float32 scalar (make_loss(model)).
    subset: which weights train.
    config: the CloudConfig (mode, AdamW settings, the optional measurements).
    mesh: a mesh to shard the step on; None: no mesh.
    model: the model (its specs' logical axes); required with a mesh.
    rules: the logical-axis rules.

  Returns:
    The CloudStep: init(trainable) -> cloud_state; step(cloud_state, trainable, frozen,
    batches, key=None) -> (cloud_state, direction, stats), cloud_state donated.
  """
  return CloudStep(loss_fn, subset, config, mesh, model, rules)

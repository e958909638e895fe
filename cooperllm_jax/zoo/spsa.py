"""SPSA estimators (MeZO): projected gradients from forward passes only.

For probe p with direction z_p (Gaussian N(0, I_d) or Rademacher, from the key schedule):

    central   g_p = (L(theta + eps z_p) - L(theta - eps z_p)) / (2 eps)     2 forwards per probe
    one_sided g_p = (L(theta + eps z_p) - L(theta)) / eps                   1 forward per probe + 1

optionally clipped to [-clip, clip]. The gradient estimate is (1/P) sum_p g_p z_p and SGD steps
theta <- theta - lr (1/P) sum_p g_p z_p. With P = 1, central, Gaussian and no clipping this is exactly
MeZO: no 1/d factor, E[z z^T] = I, so on a quadratic the estimate is unbiased for the gradient
(both distributions; the one-sided bias eps/2 E[(z^T H z) z] vanishes by symmetry). Only the scalars
g_p leave the client; z is regenerated from its address.
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.tree_math import PyTree
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.guided import Guidance
from cooperllm_jax.zoo.perturb import IMPLS, Perturbation, apply_directions, coefficients
from cooperllm_jax.zoo.trainable import Subset, overlay, trainable_paths

SCHEMES = ('central', 'one_sided')

# loss_fn(params, batch, perturb) -> float32 scalar; params = overlay(frozen, trainable).
LossFn = Callable[..., jax.Array]
# step(trainable, frozen, batch, keys [P], lr, guide=None) -> (trainable, g [P], loss).
ZOStep = Callable[..., tuple[PyTree, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Estimator:
  """The SPSA estimator's settings: a client estimates projected gradients with these.

  Attributes:
    eps: the perturbation radius (> 0).
    probes: P, the directions averaged per step (>= 1).
    scheme: 'central' (L(theta + eps z) and L(theta - eps z)) or 'one_sided' (L(theta + eps z)
      against one shared L(theta) per step).
    distribution: the directions' distribution, one of keys.DISTRIBUTIONS ('gaussian',
      'rademacher', 'gaussian_hash', 'rademacher_hash').
    clip: bound on |g_p|; None turns clipping off.
    perturb_impl: forward perturbation of 2-D weights, 'xla' or 'pallas' (the fused kernel,
      Gaussian directions only).
  """
  eps: float = 1e-3
  probes: int = 1
  scheme: str = 'central'
  distribution: str = 'gaussian'
  clip: Optional[float] = None       # bound on |g_p|, None = off
  perturb_impl: str = 'xla'          # forward perturbation of 2-D weights: 'xla' or 'pallas'

  def __post_init__(self):
    if not self.eps > 0:
      raise ConfigError(f'eps must be > 0, got {self.eps}')
    if self.probes < 1:
      raise ConfigError(f'probes must be >= 1, got {self.probes}')
    if self.scheme not in SCHEMES:
      raise ConfigError(f'unknown SPSA scheme {self.scheme!r}; choose one of {", ".join(SCHEMES)}')
    if self.distribution not in keys_lib.DISTRIBUTIONS:
      raise ConfigError(f'unknown distribution {self.distribution!r}; choose one of '
                        f'{", ".join(keys_lib.DISTRIBUTIONS)}')
    if self.clip is not None and not self.clip > 0:
      raise ConfigError(f'clip must be > 0 or None, got {self.clip}')
    if self.perturb_impl not in IMPLS:
      raise ConfigError(f'unknown perturb_impl {self.perturb_impl!r}; choose one of '
                        f'{", ".join(IMPLS)}')
    if self.perturb_impl == 'pallas' and self.distribution != 'gaussian':
      raise ConfigError("perturb_impl='pallas' draws threefry Gaussian directions only "
                        f"(distribution='gaussian', got {self.distribution!r})")

  @property
  def forwards_per_step(self) -> int:
    return self.forwards(self.probes, 1)

  def forwards(self, probes: ArrayLike, steps: ArrayLike) -> ArrayLike:
    """Forward passes of `probes` probes over `steps` local steps (one-sided: + L(theta) a step);
    works on integers and integer arrays alike."""
    return 2 * probes if self.scheme == 'central' else probes + steps


def loss_at(loss_fn: LossFn, trainable, frozen, batch, key, scale, distribution='gaussian',
            subset: Subset = Subset(), guide: Optional[Guidance] = None, impl: str = 'xla'):
  """L(theta + scale * z(key)) in float32 through the model's hooks; key=None gives L(theta).
  With `guide`, z is the guided direction (ZGR); impl picks XLA or the fused Pallas kernel."""
  pert = Perturbation(trainable_paths(trainable), key, scale, distribution, subset.lora_scale,
                      guide, impl)
  trainable, pert = pert.hoist(trainable)
  return loss_fn(overlay(frozen, trainable), batch, pert).astype(jnp.float32)


def make_projected_gradient(loss_fn: LossFn, est: Estimator, subset: Subset = Subset()):
  """pg(trainable, frozen, batch, key, base_loss, guide=None) -> (g, loss) for one probe.

  base_loss is L(theta), used by the one-sided scheme only; loss is the probe's mean loss.
  """
  def pg(trainable, frozen, batch, key, base_loss, guide=None):
    at = lambda scale: loss_at(loss_fn, trainable, frozen, batch, key, scale, est.distribution,
                               subset, guide, est.perturb_impl)
    plus = at(est.eps)
    if est.scheme == 'central':
      minus = at(-est.eps)
      g, loss = (plus - minus) / (2 * est.eps), (plus + minus) / 2
    else:
      g, loss = (plus - base_loss) / est.eps, base_loss
    if est.clip is not None:
      g = jnp.clip(g, -est.clip, est.clip)
    return g, loss

  return pg


def make_estimate(loss_fn: LossFn, est: Estimator, subset: Subset = Subset()):
  """estimate(trainable, frozen, batch, keys[P], guide=None) -> (g [P], loss): probes run one after
  another (lax.map), so one forward's activations are alive at a time."""
  pg = make_projected_gradient(loss_fn, est, subset)

  def estimate(trainable, frozen, batch, keys, guide=None):
    base = jnp.float32(0)
    if est.scheme == 'one_sided':
      base = loss_at(loss_fn, trainable, frozen, batch, None, 0.0, est.distribution, subset)
    g, losses = jax.lax.map(lambda k: pg(trainable, frozen, batch, k, base, guide), keys)
    return g, losses.mean()

  return estimate


def make_zo_step(loss_fn: LossFn, est: Estimator, subset: Subset = Subset()) -> ZOStep:
  """step(trainable, frozen, batch, keys[P], lr, guide=None) -> (trainable, g [P], loss), pure and
  jittable.

  One ZO-SGD step: estimate, then apply the P entries (keys[p], coefficients(lr, g_p, 1/P)) with the
  same functions the edge replays with. With `guide` (ZGR) the probes use guided directions.

  Args:
    loss_fn: loss_fn(params, batch, perturb) -> float32 scalar (models.make_loss).
    est: the Estimator (eps, probes, scheme, distribution, clip, perturb_impl).
    subset: which weights train; its LoRA scale is applied to perturbed adapters.

  Returns:
    step(trainable, frozen, batch, keys, lr, guide=None) -> (trainable, g, loss): keys [P]
    threefry probe keys (address_keys); lr the learning rate; guide a Guidance or None. g is
    float32 [P], the projected gradients (clipped if est.clip); loss the float32 mean loss of
    the probes. The step does not donate: donate `trainable` when jitting to update it in
    place.
  """
  estimate = make_estimate(loss_fn, est, subset)

  def step(trainable, frozen, batch, keys, lr, guide=None):
    g, loss = estimate(trainable, frozen, batch, keys, guide)
    weights = jnp.full_like(g, 1.0 / est.probes)
    trainable = apply_directions(trainable, keys, coefficients(lr, g, weights), est.distribution,
                                 guide)
    return trainable, g, loss

  return step

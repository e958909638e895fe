"""fwdllm: perturbations chosen by cosine similarity to the previous global update, and
extra probes while the estimate is noisy (our reading of Xu et al., 2024, on the scalar protocol).

Each probe slot p draws `candidates` directions at addresses (round, client, step, p * candidates + j)
and keeps the one most aligned (largest |cos|) with the previous round's global update; before any
update exists (round 1) candidate 0 is kept. Probes run until at least `min_probes` are done and the
standard error of the mean projected gradient, sqrt(var(g) / n), falls below `var_threshold`
(relative to the mean |g|), or `max_probes` are done. Unused slots carry weight 0, so the edge replays
the uplink exactly like FedMeZO's. The choice is deliberately biased towards the last update.
Its config section is `fwdllm` (FwdLLMConfig; zo.probes is the maximum).
"""

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax import config as config_lib
from cooperllm_jax.config import field
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated.algorithms.scalar import ScalarProtocol
from cooperllm_jax.federated.api import ServerState
from cooperllm_jax.federated.clients import Uplink, scan_local_steps
from cooperllm_jax.federated.registry import register
from cooperllm_jax.tree_math import tree_dot
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.perturb import apply_directions, coefficients
from cooperllm_jax.zoo.spsa import Estimator, loss_at, make_projected_gradient
from cooperllm_jax.zoo.trainable import Subset


def cosine_to(prev_update, key, distribution):
  """cos(z(key), prev_update) without keeping z: z is regenerated leaf by leaf inside the dots."""
  z = keys_lib.tree_direction(key, prev_update, distribution)
  norm = jnp.sqrt(tree_dot(z, z) * tree_dot(prev_update, prev_update))
  return tree_dot(z, prev_update) / jnp.maximum(norm, 1e-30)


def make_client_update(loss_fn, est: Estimator, subset: Subset = Subset(), candidates: int = 4,
                       min_probes: int = 1, var_threshold: float = 0.5):
  """client_update(trainable, frozen, batches, seed, round, client, lr, prev_update)
  -> (trainable, Uplink with est.probes slots, losses [S]). est.probes is the maximum."""
  pg = make_projected_gradient(loss_fn, est, subset)
  max_probes = est.probes

  def choose(seed, round_index, client, step, slot, prev_update):
    addrs = jnp.stack([jnp.broadcast_to(jnp.int32(round_index), (candidates,)),
                       jnp.broadcast_to(jnp.int32(client), (candidates,)),
                       jnp.broadcast_to(jnp.int32(step), (candidates,)),
                       slot * candidates + jnp.arange(candidates, dtype=jnp.int32)], -1)
    cos = jax.lax.map(lambda a: cosine_to(prev_update, keys_lib.address_key(seed, tuple(a)),
                                          est.distribution), addrs)
    return addrs[jnp.argmax(jnp.abs(cos))]

  def client_update(trainable, frozen, batches, seed, round_index, client, lr, prev_update):
    def step(t, batch, s):
      base = jnp.float32(0)
      if est.scheme == 'one_sided':
        base = loss_at(loss_fn, t, frozen, batch, None, 0.0, est.distribution, subset)

      def more(carry):
        n, _, g, _ = carry
        mean_abs = jnp.sum(jnp.abs(g)) / jnp.maximum(n, 1)
        var = (jnp.sum(g * g) - n * (jnp.sum(g) / jnp.maximum(n, 1)) ** 2) / jnp.maximum(n - 1, 1)
        stderr = jnp.sqrt(jnp.maximum(var, 0.0) / jnp.maximum(n, 1))
        return (n < max_probes) & ((n < min_probes) | (stderr > var_threshold * mean_abs))

      def probe(carry):
        n, addrs, g, losses = carry
        a = choose(seed, round_index, client, s, n, prev_update)
        gn, ln = pg(t, frozen, batch, keys_lib.address_key(seed, tuple(a)), base)
        return n + 1, addrs.at[n].set(a), g.at[n].set(gn), losses.at[n].add(ln)

      init = (jnp.int32(0), jnp.zeros((max_probes, 4), jnp.int32),
              jnp.zeros((max_probes,), jnp.float32), jnp.zeros((max_probes,), jnp.float32))
      n, addrs, g, losses = jax.lax.while_loop(more, probe, init)
      weights = jnp.where(jnp.arange(max_probes) < n, 1.0 / n, 0.0).astype(jnp.float32)
      t = apply_directions(t, keys_lib.address_keys(seed, addrs), coefficients(lr, g, weights),
                           est.distribution)
      return t, Uplink(addrs, g, weights), losses.sum() / n

    return scan_local_steps(step, trainable, batches)

  return client_update


@dataclasses.dataclass(frozen=True)
class FwdLLMConfig:
  candidates: int = field(4, 'directions drawn per probe slot, the best cosine to the last '
                          'update kept')
  min_probes: int = field(1, 'probes a step runs at least (zo.probes: at most)')
  var_threshold: float = field(0.5, "more probes while the gradient's standard error exceeds "
                               'this share of its mean')

  RENAMED: ClassVar[dict] = {'zo.fwdllm_candidates': 'candidates',
                             'zo.fwdllm_min_probes': 'min_probes',
                             'zo.fwdllm_var_threshold': 'var_threshold'}

  def __post_init__(self):
    config_lib.positive('fwdllm.', self, 'candidates', 'min_probes')
    config_lib.check(config_lib.finite(self.var_threshold) and self.var_threshold >= 0,
                     f'fwdllm.var_threshold must be >= 0, got {self.var_threshold}')


class FwdLLMState(NamedTuple):
  prev_update: Any              # the last round's global update, float32 (zeros before round 1)


@register('fwdllm', config=FwdLLMConfig)
@dataclasses.dataclass
class FwdLLM(ScalarProtocol):
  """The scalar protocol with FwdLLM's client; the state keeps the previous global update."""
  fwdllm_candidates: int = 4
  fwdllm_min_probes: int = 1
  fwdllm_var_threshold: float = 0.5

  address_bytes: ClassVar[int] = 1   # the chosen candidate

  @classmethod
  def from_config(cls, cfg, model, public=None):
    del public
    own = cfg.fwdllm
    if own.min_probes > cfg.zo.probes:
      raise ConfigError(f'fwdllm.min_probes={own.min_probes} must be at most zo.probes='
                        f'{cfg.zo.probes} (the maximum)')
    return cls(**cls.options(cfg, model), fwdllm_candidates=own.candidates,
               fwdllm_min_probes=own.min_probes, fwdllm_var_threshold=own.var_threshold)

  def make_client_update(self, loss_fn):
    return make_client_update(loss_fn, self.est, self.subset, self.fwdllm_candidates,
                              self.fwdllm_min_probes, self.fwdllm_var_threshold)

  def init_extra(self, trainable) -> FwdLLMState:
    return FwdLLMState(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable))

  def client_extra(self, state: ServerState) -> tuple:
    return (state.extra.prev_update,)

  def after_edge(self, old: ServerState, trainable) -> ServerState:
    update = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), trainable,
                          old.trainable)
    return old._replace(trainable=trainable, extra=FwdLLMState(update))

  def uplink_bytes(self, used, steps):
    return super().uplink_bytes(used, steps) + steps     # + the probe count of each step

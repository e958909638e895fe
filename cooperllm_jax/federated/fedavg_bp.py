"""`fedavg_bp`: clients backprop with optax, the edge averages their deltas (the first-order bound).

Pure, jittable functions. `make_client_update` trains one client with lax.scan over its local
steps; `make_round` maps it over the round's clients (lax.map with batch_size: vmap over `chunk`
clients at a time) and applies the sample-weighted mean delta.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cooperllm_jax.federated.zo import fedavg_weights
from cooperllm_jax.models.common import make_loss


def make_client_update(model, optimizer: optax.GradientTransformation) -> Callable:
  """client_update(params, batches) -> (delta, losses).

  batches: {name: [steps, batch, ...]}; delta has params' structure; losses: float32 [steps].
  The optimizer state starts fresh every round, as in FedAvg.
  """
  loss = make_loss(model)

  def client_update(params, batches):
    def step(carry, batch):
      p, state = carry
      value, grads = jax.value_and_grad(loss)(p, batch)
      updates, state = optimizer.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), value

    (trained, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), batches)
    return jax.tree.map(jnp.subtract, trained, params), losses

  return client_update


def make_round(client_update: Callable, chunk: int = 1) -> Callable:
  """round(params, batches, counts) -> (new_params, losses [C, steps]), jitted.

  batches: {name: [C, steps, batch, ...]}; counts: float32 [C] example counts (FedAvg weights).
  """

  @jax.jit
  def round_fn(params, batches, counts):
    deltas, losses = jax.lax.map(lambda b: client_update(params, b), batches, batch_size=chunk)
    weights = fedavg_weights(counts)
    mean = jax.tree.map(lambda d: jnp.tensordot(weights, d.astype(jnp.float32), axes=1), deltas)
    return jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, mean), losses

  return round_fn

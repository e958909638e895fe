"""Zeroth-order federated rounds: clients upload scalars, the edge replays them.

`make_client_update` trains one client for S local steps under lax.scan and returns its uplink: per
step and probe the address (round, client, step, probe), the projected gradient g and the entry's
weight (1/P for a used probe, 0 for an unused slot). `make_round` runs many clients in one jitted
call (lax.map with batch_size = vmap over `chunk` clients at a time) and has the edge update the
global trainable weights by replaying the uplinks, weighted by the clients' example counts. The
clients' local models never leave the map: only scalars do, as in the real protocol.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.perturb import coefficients, replay
from cooperllm_jax.zoo.spsa import Estimator, make_zo_step
from cooperllm_jax.zoo.trainable import Subset

SHARED = -1  # an address field shared by every client (DeComFL's seeds, FedKSeed's candidate pool)


class Uplink(NamedTuple):
  """One client's scalars for a round: addresses int32 [S, P, 4], scalars and weights float32 [S, P]."""
  addresses: jax.Array
  scalars: jax.Array
  weights: jax.Array


# address_fn(seed, round, client, step, probes) -> int32 [probes, 4]
AddressFn = Callable


def own_addresses(seed, round_index, client, step, probes):
  """FedMeZO: every client, step and probe has its own direction."""
  del seed
  p = jnp.arange(probes, dtype=jnp.int32)
  return jnp.stack([jnp.full_like(p, round_index), jnp.full_like(p, client),
                    jnp.full_like(p, step), p], -1)


def shared_addresses(seed, round_index, client, step, probes):
  """DeComFL: the server issues one set of directions per (round, step, probe) to all clients."""
  del client
  return own_addresses(seed, round_index, SHARED, step, probes)


def candidate_addresses(num_candidates: int) -> AddressFn:
  """FedKSeed: each probe picks one of K seeds fixed for the whole run, uniformly from its address."""

  def addresses(seed, round_index, client, step, probes):
    pick = keys_lib.address_key(seed, (round_index, client, step, SHARED))
    k = jax.random.randint(pick, (probes,), 0, num_candidates, dtype=jnp.int32)
    shared = jnp.full_like(k, SHARED)
    return jnp.stack([shared, shared, shared, k], -1)

  return addresses


def make_client_update(loss_fn, est: Estimator, subset: Subset = Subset(),
                       address_fn: AddressFn = own_addresses):
  """client_update(trainable, frozen, batches, seed, round, client, lr) -> (trainable, Uplink, losses).

  batches: {name: [S, B, ...]}; losses: float32 [S] (the mean loss of each step's probes).
  """
  zo_step = make_zo_step(loss_fn, est, subset)

  def client_update(trainable, frozen, batches, seed, round_index, client, lr):
    def step(t, inputs):
      batch, s = inputs
      addresses = address_fn(seed, round_index, client, s, est.probes)
      t, g, loss = zo_step(t, frozen, batch, keys_lib.address_keys(seed, addresses), lr)
      return t, (Uplink(addresses, g, jnp.full_like(g, 1.0 / est.probes)), loss)

    num_steps = jax.tree.leaves(batches)[0].shape[0]
    trainable, (uplink, losses) = jax.lax.scan(
        step, trainable, (batches, jnp.arange(num_steps, dtype=jnp.int32)))
    return trainable, uplink, losses

  return client_update


def edge_replay(trainable, seed, uplinks: Uplink, client_weights, lr, distribution='gaussian'):
  """Global trainable after replaying all clients' uplinks [C, S, P, ...] with FedAvg weights [C]."""
  coefs = coefficients(lr, uplinks.scalars, uplinks.weights) * client_weights[:, None, None]
  return replay(trainable, seed, uplinks.addresses.reshape(-1, 4), coefs.reshape(-1), distribution)


def average_shared(uplinks: Uplink, client_weights) -> Uplink:
  """For shared addresses (identical across clients): one entry per (step, probe) with the weighted
  mean scalar. What a DeComFL server broadcasts; replaying it equals replaying every client."""
  return Uplink(uplinks.addresses[0], jnp.tensordot(client_weights, uplinks.scalars, axes=1),
                uplinks.weights[0])


def client_map(client_fn, inputs, chunk: int, backend: str = 'map'):
  """Maps client_fn over the leading (client) axis of inputs.

  'map': lax.map with batch_size=chunk (vmap over chunk clients at a time; inside one jit).
  'loop': a plain Python loop over clients, each call un-batched, for debugging (print, pdb).
  """
  if backend == 'map':
    return jax.lax.map(client_fn, inputs, batch_size=chunk)
  if backend == 'loop':
    n = jax.tree.leaves(inputs)[0].shape[0]
    outs = [client_fn(jax.tree.map(lambda x: x[i], inputs)) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  raise ValueError(f"unknown client backend {backend!r}; choose 'map' or 'loop'")

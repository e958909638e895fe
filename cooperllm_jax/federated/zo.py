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
  """client_update(trainable, frozen, batches, seed, round, client, lr, guide=None)
  -> (trainable, Uplink, losses).

  batches: {name: [S, B, ...]}; losses: float32 [S] (the mean loss of each step's probes);
  guide: the round's ZGR guidance (zoo.Guidance), None for plain directions.
  """
  zo_step = make_zo_step(loss_fn, est, subset)

  def client_update(trainable, frozen, batches, seed, round_index, client, lr, guide=None):
    def step(t, inputs):
      batch, s = inputs
      addresses = address_fn(seed, round_index, client, s, est.probes)
      t, g, loss = zo_step(t, frozen, batch, keys_lib.address_keys(seed, addresses), lr, guide)
      return t, (Uplink(addresses, g, jnp.full_like(g, 1.0 / est.probes)), loss)

    num_steps = jax.tree.leaves(batches)[0].shape[0]
    trainable, (uplink, losses) = jax.lax.scan(
        step, trainable, (batches, jnp.arange(num_steps, dtype=jnp.int32)))
    return trainable, uplink, losses

  return client_update


def edge_replay(trainable, seed, uplinks: Uplink, client_weights, lr, distribution='gaussian',
                shared: bool = False, guide=None):
  """Global trainable after replaying the clients' uplinks [C, S, P, ...] with FedAvg weights [C].

  shared=True (addresses identical across clients, as in DeComFL): the scalars are averaged per
  (step, probe) first and S x P entries replayed, which is what such a server broadcasts.
  """
  if shared:
    uplinks = average_shared(uplinks, client_weights)
    coefs = coefficients(lr, uplinks.scalars, uplinks.weights)
  else:
    coefs = coefficients(lr, uplinks.scalars, uplinks.weights) * client_weights[:, None, None]
  return replay(trainable, seed, uplinks.addresses.reshape(-1, 4), coefs.reshape(-1), distribution,
                guide)


def average_shared(uplinks: Uplink, client_weights) -> Uplink:
  """One entry per (step, probe) with the weighted mean scalar (addresses shared by all clients)."""
  return Uplink(uplinks.addresses[0], jnp.tensordot(client_weights, uplinks.scalars, axes=1),
                uplinks.weights[0])


def make_round_fn(client_update, *, seed: int, lr: float, chunk: int = 1,
                  distribution: str = 'gaussian', shared: bool = False):
  """The pure round (see make_round); jit it yourself, e.g. inside a larger step."""

  def round_fn(trainable, frozen, batches, counts, clients, round_index, *extra, guide=None):
    guided = {} if guide is None else {'guide': guide}

    def one(inputs):
      b, c = inputs
      _, uplink, losses = client_update(trainable, frozen, b, seed, round_index, c, lr, *extra,
                                        **guided)
      return uplink, losses  # the local model stays on the client: only scalars leave

    uplinks, losses = jax.lax.map(one, (batches, clients), batch_size=chunk)
    weights = counts / counts.sum()
    new = edge_replay(trainable, seed, uplinks, weights, lr, distribution, shared, guide)
    return new, uplinks, losses

  return round_fn


def make_round(client_update, *, seed: int, lr: float, chunk: int = 1,
               distribution: str = 'gaussian', shared: bool = False):
  """round(trainable, frozen, batches, counts, clients, round_index, *extra, guide=None)
  -> (trainable, uplinks, losses), jitted, `trainable` donated.

  batches {name: [C, S, B, ...]}; counts float32 [C] (FedAvg weights); clients int32 [C];
  round_index int32; extra: further client_update args (e.g. FwdLLM's previous update); guide:
  the round's ZGR guidance, used by every client and by the edge's replay.
  uplinks: Uplink with [C, S, P, ...] leaves; losses float32 [C, S]. One compile per shape: clients
  run in lax.map with batch_size=chunk (vmap over chunk clients at a time).
  """
  return jax.jit(make_round_fn(client_update, seed=seed, lr=lr, chunk=chunk,
                               distribution=distribution, shared=shared), donate_argnums=0)

"""The clients of the scalar protocols: local ZO training that uploads (address, scalar) entries.

`make_client_update` trains one client for S local steps under lax.scan (`scan_local_steps`, the
one local-steps loop every ZO client uses) and returns its uplink: per step and probe the address
(round, client, step, probe), the projected gradient g and the entry's weight (1/P for a used
probe, 0 for an unused slot). `make_clients_fn` runs many clients in one jittable call (lax.map with
batch_size = vmap over `chunk` clients at a time, optionally split over the mesh's 'clients' axis).
The clients' local models never leave the map: only scalars do, as in the real protocol. The
channel (federated/channel.py) and the edge (federated/edge.py) take it from there; round.py chains
the three.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax import mesh as mesh_lib
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.perturb import master
from cooperllm_jax.tree_math import PyTree
from cooperllm_jax.zoo.spsa import Estimator, LossFn, make_zo_step
from cooperllm_jax.zoo.trainable import Subset

SHARED = -1  # an address field shared by every client (DeComFL's seeds, FedKSeed's candidate pool)


class Uplink(NamedTuple):
  """One client's scalars for a round: addresses int32 [S, P, 4], scalars and weights float32
  [S, P].

  Attributes:
    addresses: int32 [S, P, 4], each probe's (round, client, step, probe) address (SHARED, -1,
      in a field every client shares).
    scalars: float32 [S, P], the projected gradients g.
    weights: float32 [S, P], each entry's weight in its step (1/P).
  """
  addresses: jax.Array
  scalars: jax.Array
  weights: jax.Array


# address_fn(seed, round, client, step, probes) -> int32 [probes, 4]
AddressFn = Callable[..., jax.Array]
# client_update(trainable, frozen, batches, seed, round, client, lr, guide=None)
#   -> (trainable, Uplink, losses [S])
ClientUpdate = Callable[..., tuple[PyTree, Uplink, jax.Array]]


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


def scan_local_steps(step: Callable, trainable, batches):
  """(trainable, Uplink [S, ...], losses [S]) after step(trainable, batch, s) -> (trainable, uplink,
  loss) over the S local batches {name: [S, B, ...]}, under lax.scan."""
  def body(t, inputs):
    batch, s = inputs
    t, uplink, loss = step(t, batch, s)
    return t, (uplink, loss)

  num_steps = jax.tree.leaves(batches)[0].shape[0]
  # Local steps accumulate in a float32 master copy (bfloat16 would drop sub-ulp updates).
  trainable, (uplink, losses) = jax.lax.scan(
      body, master(trainable), (batches, jnp.arange(num_steps, dtype=jnp.int32)))
  return trainable, uplink, losses


def make_client_update(loss_fn: LossFn, est: Estimator, subset: Subset = Subset(),
                       address_fn: AddressFn = own_addresses) -> ClientUpdate:
  """client_update(trainable, frozen, batches, seed, round, client, lr, guide=None)
  -> (trainable, Uplink, losses): one client's S local ZO steps under lax.scan, pure and jittable.
  round is 1-based (make_round); the local model stays with the client, the Uplink is what it sends.

  Args:
    loss_fn: loss_fn(params, batch, perturb) -> float32 scalar (models.make_loss).
    est: the Estimator.
    subset: which weights train.
    address_fn: address_fn(seed, round, client, step, probes) -> int32 [probes, 4], the probes'
      addresses (own_addresses: a direction per client, step and probe).

  Returns:
    client_update(trainable, frozen, batches, seed, round, client, lr, guide=None)
    -> (trainable, uplink, losses). batches: {name: [S, B, ...]}; guide: the round's ZGR
    guidance (zoo.Guidance), None for plain directions. The returned trainable is the float32
    master copy after the S steps (narrower float leaves are upcast); uplink: the Uplink with
    [S, P] rows; losses: float32 [S] (the mean loss of each step's probes). Nothing is donated.
  """
  zo_step = make_zo_step(loss_fn, est, subset)

  def client_update(trainable, frozen, batches, seed, round_index, client, lr, guide=None):
    def step(t, batch, s):
      addresses = address_fn(seed, round_index, client, s, est.probes)
      t, g, loss = zo_step(t, frozen, batch, keys_lib.address_keys(seed, addresses), lr, guide)
      return t, Uplink(addresses, g, jnp.full_like(g, 1.0 / est.probes)), loss

    return scan_local_steps(step, trainable, batches)

  return client_update


def make_clients_fn(client_update, *, seed: int, chunk: int = 1, mesh=None):
  """clients(trainable, frozen, batches, clients, round_index, lr, *extra, guide=None)
  -> (uplinks [C, S, P, ...], losses [C, S]): every sampled client's local training in one
  lax.map (vmap over `chunk` clients at a time). The local models stay on the clients.

  With a mesh, each device of its 'clients' axis maps over its share of the clients and the
  uplinks and losses come back replicated (cooperllm_jax/mesh.py); C must divide evenly."""

  def clients_fn(trainable, frozen, batches, clients, round_index, lr, *extra, guide=None):
    def local(batches, clients, trainable, frozen, round_index, extra, guide):
      guided = {} if guide is None else {'guide': guide}

      def one(inputs):
        b, c = inputs
        _, uplink, losses = client_update(trainable, frozen, b, seed, round_index, c, lr, *extra,
                                          **guided)
        return uplink, losses  # only scalars leave the client

      return jax.lax.map(one, (batches, clients), batch_size=chunk)

    run = local if mesh is None else mesh_lib.over_clients(local, mesh)
    return run(batches, clients, trainable, frozen, round_index, extra, guide)

  return clients_fn

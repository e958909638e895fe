"""Zeroth-order federated rounds: clients upload scalars, the edge replays them.

`make_client_update` trains one client for S local steps under lax.scan and returns its uplink: per
step and probe the address (round, client, step, probe), the projected gradient g and the entry's
weight (1/P for a used probe, 0 for an unused slot). `make_round` runs many clients in one jitted
call (lax.map with batch_size = vmap over `chunk` clients at a time) and has the edge update the
global trainable weights by replaying the uplinks, weighted by the clients' example counts. The
clients' local models never leave the map: only scalars do, as in the real protocol.

`edge_replay` is the edge: FedAvg replay by default, or a robust combination (`Aggregation`) that
bounds what a few hostile clients can do to the global model.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import mesh as mesh_lib
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.perturb import coefficients, master, replay
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
    # Local steps accumulate in a float32 master copy (bfloat16 would drop sub-ulp updates).
    trainable, (uplink, losses) = jax.lax.scan(
        step, master(trainable), (batches, jnp.arange(num_steps, dtype=jnp.int32)))
    return trainable, uplink, losses

  return client_update


AGGREGATIONS = ('mean', 'clip', 'trimmed_mean', 'median')


@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How the edge combines the round's uplinks (clients that did not arrive have weight 0):

  mean          FedAvg: every entry replayed with its client's example-count weight.
  clip          norm bounding: a client whose scalars (w * g over its steps and probes) have an L2
                norm above `clip` x the median norm of the round's clients is scaled down to that
                bound, then FedAvg. Bounds a scaled client's influence; a sign flip within the
                bound still counts.
  trimmed_mean  per coordinate, the unweighted mean of the clients' values after cutting
                floor(trim * n) of the n from each end (at most (n - 1) // 2);
  median        the same with the most cutting: the coordinate-wise median.
  For trimmed_mean and median the coordinates are, with shared addresses (DeComFL), the scalar of
  each (step, probe), so the edge still replays S x P entries; with per-client addresses (FedMeZO,
  CooperLLM, FedKSeed, FwdLLM) a client's scalars only mean something along its own directions, so
  the edge replays each client's ledger on its own (its local model, exactly) and takes the
  statistic over the clients' dense deltas: C copies of the trainable weights at the edge, and every
  client can still recompute the result from the broadcast ledger.
  """
  rule: str = 'mean'
  trim: float = 0.2
  clip: float = 1.0

  def __post_init__(self):
    if self.rule not in AGGREGATIONS:
      raise ConfigError(f'unknown aggregation {self.rule!r}; choose one of '
                        f'{", ".join(AGGREGATIONS)}')
    if not 0.0 <= self.trim <= 0.5:
      raise ConfigError(f'aggregation_trim must be in [0, 0.5], got {self.trim}')
    if not self.clip > 0:
      raise ConfigError(f'aggregation_clip must be > 0, got {self.clip}')


def trimmed_mean(values, valid, trim):
  """Per coordinate, the mean over axis 0 of the valid values left after cutting floor(trim * n)
  (at most (n - 1) // 2, so trim=0.5 is the median) from each end; 0 where none is valid.
  values [C, ...]; valid bool, of values' leading shape ([C] or [C, S, P]): unweighted."""
  valid = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim)),
                           values.shape)
  n = valid.sum(0)
  k = jnp.maximum(jnp.minimum(jnp.floor(trim * n).astype(jnp.int32), (n - 1) // 2), 0)
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf), axis=0)
  rank = jnp.arange(values.shape[0]).reshape((-1,) + (1,) * (values.ndim - 1))
  keep = (rank >= k) & (rank < n - k)
  return jnp.where(n > 0, jnp.sum(jnp.where(keep, ordered, 0.0), 0) / jnp.maximum(n - 2 * k, 1),
                   0.0)


def clip_clients(uplinks: Uplink, arrived, multiple: float) -> Uplink:
  """Scales each client's scalars down to `multiple` x the median L2 norm of the arrived clients'
  (weight-scaled) scalars; clients within the bound are untouched."""
  norms = jnp.sqrt(jnp.sum((uplinks.weights * uplinks.scalars) ** 2, axis=(1, 2)))
  bound = multiple * trimmed_mean(norms, arrived, 0.5)
  factor = jnp.where(norms > bound, bound / jnp.where(norms > 0, norms, 1.0), 1.0)
  return uplinks._replace(scalars=uplinks.scalars * factor[:, None, None])


def edge_replay(trainable, seed, uplinks: Uplink, client_weights, lr, distribution='gaussian',
                shared: bool = False, guide=None, aggregation: Aggregation = Aggregation()):
  """Global trainable after the edge combines the clients' uplinks [C, S, P, ...]; client_weights
  [C] are the FedAvg weights (0: the client's upload did not arrive). See `Aggregation`.

  shared=True (addresses identical across clients, as in DeComFL): the scalars are combined per
  (step, probe) first and S x P entries replayed, which is what such a server broadcasts.
  """
  arrived = client_weights > 0
  if aggregation.rule == 'clip':
    uplinks = clip_clients(uplinks, arrived, aggregation.clip)
  if aggregation.rule in ('mean', 'clip'):
    if shared:
      uplinks = average_shared(uplinks, client_weights)
      coefs = coefficients(lr, uplinks.scalars, uplinks.weights)
    else:
      coefs = coefficients(lr, uplinks.scalars, uplinks.weights) * client_weights[:, None, None]
    return replay(trainable, seed, uplinks.addresses.reshape(-1, 4), coefs.reshape(-1),
                  distribution, guide)
  trim = 0.5 if aggregation.rule == 'median' else aggregation.trim
  if shared:
    valid = arrived[:, None, None] & (uplinks.weights > 0)
    scalars = trimmed_mean(uplinks.scalars, valid, trim)
    weights = jnp.where(valid.any(0), uplinks.weights.max(0), 0.0)
    coefs = coefficients(lr, scalars, weights)
    return replay(trainable, seed, uplinks.addresses[0].reshape(-1, 4), coefs.reshape(-1),
                  distribution, guide)

  def local(up):  # one client's local model, rebuilt from its own entries
    coefs = coefficients(lr, up.scalars, up.weights)
    return replay(trainable, seed, up.addresses.reshape(-1, 4), coefs.reshape(-1), distribution,
                  guide)

  locals_ = jax.lax.map(local, uplinks)
  return jax.tree.map(
      lambda t, l: (t.astype(jnp.float32) + trimmed_mean(
          l.astype(jnp.float32) - t.astype(jnp.float32)[None], arrived, trim)).astype(t.dtype),
      trainable, locals_)


def average_shared(uplinks: Uplink, client_weights) -> Uplink:
  """One entry per (step, probe) with the weighted mean scalar (addresses shared by all clients)."""
  return Uplink(uplinks.addresses[0], jnp.tensordot(client_weights, uplinks.scalars, axes=1),
                uplinks.weights[0])


def fedavg_weights(counts):
  """counts / counts.sum(), all zeros when no client arrived (the model then stays put)."""
  total = counts.sum()
  return counts / jnp.where(total > 0, total, 1.0)


def make_clients_fn(client_update, *, seed: int, chunk: int = 1, mesh=None):
  """clients(trainable, frozen, batches, clients, round_index, lr, *extra, guide=None)
  -> (uplinks [C, S, P, ...], losses [C, S]): every sampled client's local training in one
  lax.map (vmap over `chunk` clients at a time). The local models stay on the clients.

  With a mesh, each device of its 'clients' axis maps over its share of the clients and the
  uplinks and losses come back replicated (federated/mesh.py); C must divide evenly."""

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


def make_round_fn(client_update, *, seed: int, lr: float, chunk: int = 1,
                  distribution: str = 'gaussian', shared: bool = False, mesh=None):
  """The pure round (see make_round); jit it yourself, e.g. inside a larger step."""
  clients_fn = make_clients_fn(client_update, seed=seed, chunk=chunk, mesh=mesh)

  def round_fn(trainable, frozen, batches, counts, clients, round_index, *extra, guide=None):
    uplinks, losses = clients_fn(trainable, frozen, batches, clients, round_index, lr, *extra,
                                 guide=guide)
    new = edge_replay(trainable, seed, uplinks, fedavg_weights(counts), lr, distribution, shared,
                      guide)
    if mesh is not None:  # every device replays the gathered scalars: the model stays replicated
      new = jax.lax.with_sharding_constraint(new, mesh_lib.replicated(mesh))
    return new, uplinks, losses

  return round_fn


def make_round(client_update, *, seed: int, lr: float, chunk: int = 1,
               distribution: str = 'gaussian', shared: bool = False, mesh=None):
  """round(trainable, frozen, batches, counts, clients, round_index, *extra, guide=None)
  -> (trainable, uplinks, losses), jitted, `trainable` donated.

  batches {name: [C, S, B, ...]}; counts float32 [C] (FedAvg weights); clients int32 [C];
  round_index int32; extra: further client_update args (e.g. FwdLLM's previous update); guide:
  the round's ZGR guidance, used by every client and by the edge's replay.
  uplinks: Uplink with [C, S, P, ...] leaves; losses float32 [C, S]. One compile per shape: clients
  run in lax.map with batch_size=chunk (vmap over chunk clients at a time); with a mesh, split
  over its 'clients' axis first (pass inputs from federated.mesh.place_round).
  """
  return jax.jit(make_round_fn(client_update, seed=seed, lr=lr, chunk=chunk,
                               distribution=distribution, shared=shared, mesh=mesh),
                 donate_argnums=0)

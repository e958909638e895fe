"""The edge server of the scalar protocols: combines the round's received uplinks and replays them.

`edge_replay` is FedAvg replay by default, or a robust combination (config.Aggregation) that bounds
what a few hostile clients can do to the global model. Clients that did not arrive have weight 0.


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

import jax
import jax.numpy as jnp

from cooperllm_jax.config import Aggregation
from cooperllm_jax.federated.clients import Uplink
from cooperllm_jax.zoo.perturb import coefficients, replay


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

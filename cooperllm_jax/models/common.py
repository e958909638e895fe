"""What every model shares: the perturbation hooks and the classification loss."""

from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp

Params = Any


class Perturb(Protocol):
  """How a zeroth-order client changes the weights a forward pass sees, without copying the model.

  `group(name, params, layer)` gets a top-level group's dense leaves ('layers', 'head', the embedding
  norm, ...) and returns them perturbed. For 'layers' it runs inside the lax.scan body with one
  layer's slice and the traced layer index, so at most one perturbed layer is alive at a time.
  `rows(path, table, ids)` returns table[ids] perturbed, for embedding tables: only the looked-up rows
  are ever materialized. Models never pass a table to `group`.
  """

  def group(self, name: str, params: Params, layer: Optional[jax.Array]) -> Params:
    ...

  def rows(self, path: tuple, table: jax.Array, ids: jax.Array) -> jax.Array:
    ...


def hook(perturb: Optional[Perturb], group: str, params: Params, layer=None) -> Params:
  return params if perturb is None else perturb.group(group, params, layer)


def lookup(perturb: Optional[Perturb], path: tuple, table: jax.Array, ids: jax.Array) -> jax.Array:
  """table[ids], through the perturbation's row hook when there is one."""
  return table[ids] if perturb is None else perturb.rows(path, table, ids)


def scan_layers(body, x, layers: Params, perturb: Optional[Perturb]):
  """Runs body(x, layer_params) over the stacked layers under lax.scan, hooking each layer."""
  num_layers = jax.tree.leaves(layers)[0].shape[0]

  def step(carry, inputs):
    layer_params, index = inputs
    return body(carry, hook(perturb, 'layers', layer_params, index)), None

  x, _ = jax.lax.scan(step, x, (layers, jnp.arange(num_layers, dtype=jnp.int32)))
  return x


def classification_loss(logits, labels, weight=None):
  """Mean cross-entropy in float32; `weight` masks padded examples of ragged client batches."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if weight is None:
    return nll.mean()
  weight = weight.astype(jnp.float32)
  return (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def make_loss(model: Any) -> Callable[..., jax.Array]:
  """loss(params, batch, perturb=None) -> float32 mean cross-entropy of the model's class logits
  (an Encoder's or a Decoder's), masked by batch['weight'] when present.

  Args:
    model: an Encoder or Decoder (Pretrained.model).

  Returns:
    loss(params, batch, perturb=None): batch {input_ids, attention_mask: [B, L]; labels: [B];
    optional weight: [B]}; perturb, if given, perturbs the params inside the forward pass.
    Returns the float32 scalar loss.
  """

  def loss(params: Params, batch: dict, perturb: Optional[Perturb] = None) -> jax.Array:
    return classification_loss(model.logits(params, batch, perturb), batch['labels'],
                               batch.get('weight'))

  return loss

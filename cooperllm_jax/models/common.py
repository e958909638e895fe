"""What every model shares: the perturbation hook and the classification loss."""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Params = Any

# perturb(group, params_of_group, layer_index) -> params_of_group.
# `group` is a top-level key of the params dict ('embed', 'layers', 'head', ...). For 'layers' the
# hook runs inside the lax.scan body with that layer's slice and a traced layer index, so a
# zeroth-order client can perturb one layer at a time (memory like inference); for other groups it
# runs once with layer_index=None.
Perturb = Callable[[str, Params, Optional[jax.Array]], Params]


def hook(perturb: Optional[Perturb], group: str, params: Params, layer=None) -> Params:
  return params if perturb is None else perturb(group, params, layer)


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

"""Frozen base weights kept quantized on the client (config zo.base_weights = 'int8' | 'int4').

A client never changes its frozen weights, so it holds them as `kernels.fused_perturb.Quantized`
(symmetric, one float32 scale per `group` columns; int4 packed two per byte) and dequantizes only
what the forward pass is computing: the perturbation hooks (zoo/perturb.py) dequantize one layer's
slice inside the lax.scan body and only the embedding rows a batch looks up, so the float32 copy of
the model never exists. Trainable weights stay float32: ZO-SGD updates them in place.

Leaves of rank >= 2 are quantized (layer kernels, embedding tables, untied heads); norms and biases
stay as they are. GGUF weights (SmolLM2's file is Q4_1, its embedding Q8_0) arrive dequantized from
the loader and are requantized here: int4 in groups of 32 along our kernels' output axis has Q4_1's
bit budget but not its exact values (Q4_1's blocks run along the input axis, with an offset); int8
in groups of 32 reproduces a Q8_0 table up to an ulp of its scales.
"""

import jax

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.models.spec import path_str
from kernels.fused_perturb import Quantized, dequantize, quantize

FORMATS = {'f32': None, 'int8': 8, 'int4': 4}  # name -> bits


def is_quantized(x) -> bool:
  return isinstance(x, Quantized)


def quantize_frozen(frozen, fmt: str, group: int = 32):
  """frozen with every rank >= 2 leaf quantized to `fmt` in groups of `group` columns."""
  if fmt not in FORMATS:
    raise ConfigError(f'unknown base weight format {fmt!r}; choose one of {", ".join(FORMATS)}')
  bits = FORMATS[fmt]
  if bits is None:
    return frozen

  def one(path, x):
    if x.ndim < 2:
      return x
    if group < 1 or x.shape[-1] % group:
      raise ConfigError(f'base weight group {group} does not divide the last axis of '
                        f'{path_str(path)} {tuple(x.shape)}')
    return quantize(x, group, bits, pack=bits == 4)

  out = jax.tree_util.tree_map_with_path(one, frozen)
  if not any(map(is_quantized, jax.tree.leaves(out, is_leaf=is_quantized))):
    raise ConfigError(f'base_weights={fmt!r} quantizes frozen weights of rank >= 2, and this '
                      'trainable subset leaves none frozen (use f32, or train head/lora/bitfit)')
  return out


def dequantize_tree(tree):
  """Plain float params (evaluation, the cloud, checkpoints of the merged model)."""
  return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)


def take_rows(table, ids):
  """table[ids]; only the looked-up rows of a quantized table are dequantized."""
  if not is_quantized(table):
    return table[ids]
  return dequantize(Quantized(table.values[ids], table.scales[ids], table.group, table.packed))

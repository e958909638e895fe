"""Frozen base weights kept quantized on the client (config zo.base_weights = 'int8' | 'int4').

A client never changes its frozen weights, so it holds them as `Quantized` (symmetric, one float32
scale per `group` columns; int4 packed two per byte, in the layout the fused kernel reads) and dequantizes only
what the forward pass is computing: the perturbation hooks (zoo/perturb.py) dequantize one layer's
slice inside the lax.scan body and only the embedding rows a batch looks up, so the float32 copy of
the model never exists. Trainable weights stay float32: ZO-SGD updates them in place.

Leaves of rank >= 2 are quantized (layer kernels, embedding tables, untied heads); norms and biases
stay as they are. GGUF weights (SmolLM2's file is Q4_1, its embedding Q8_0) arrive dequantized from
the loader and are requantized here: int4 in groups of 32 along our kernels' output axis has Q4_1's
bit budget but not its exact values (Q4_1's blocks run along the input axis, with an offset); int8
in groups of 32 reproduces a Q8_0 table up to an ulp of its scales.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.kernels.fused_perturb import dequantize_values, nibbles
from cooperllm_jax.models.spec import path_str


@functools.partial(jax.tree_util.register_dataclass, data_fields=['values', 'scales'],
                   meta_fields=['group', 'packed'])
@dataclasses.dataclass(frozen=True)
class Quantized:
  """Symmetric group quantization along the last axis: x ~= values * scales (per group).

  values: int8 [..., cols] (8-bit in [-127, 127], 4-bit in [-8, 7], one value per int8), or with
          `packed` int8 [..., cols / 2] holding two 4-bit values: column c < cols / 2 in the low
          nibble, column c + cols / 2 in the high one (so a block of columns unpacks by selecting a
          nibble, with no interleaving);
  scales: float32 [..., cols // group], one per `group` consecutive columns;
  group:  static int dividing cols (group = cols: one scale per row).
  """
  values: jax.Array
  scales: jax.Array
  group: int
  packed: bool = False

  @property
  def shape(self) -> tuple:
    """The dequantized array's shape."""
    v = self.values.shape
    return (*v[:-1], 2 * v[-1]) if self.packed else tuple(v)


def quantize(x, group: int, bits: int = 8, pack: bool = False) -> Quantized:
  """Round-to-nearest symmetric quantization of x (float [..., cols]) in groups of `group` columns;
  `pack` stores two values per byte (bits <= 4, even cols)."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 1 or group < 1 or x.shape[-1] % group:
    raise ValueError(f'group {group} must divide the last axis of shape {x.shape}')
  if not 2 <= bits <= 8:
    raise ValueError(f'bits must be in [2, 8] (int8 storage), got {bits}')
  if pack and (bits > 4 or x.shape[-1] % 2):
    raise ValueError(f'packing needs bits <= 4 and an even last axis, got {bits} bits, {x.shape}')
  qmax = 2 ** (bits - 1) - 1
  g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
  scales = jnp.max(jnp.abs(g), axis=-1) / qmax
  safe = jnp.where(scales > 0, scales, 1.0)  # an all-zero group stores zeros with scale 0
  values = jnp.clip(jnp.round(g / safe[..., None]), -qmax - 1, qmax).astype(jnp.int8)
  values = values.reshape(x.shape)
  if pack:
    half = x.shape[-1] // 2
    values = (values[..., half:] << 4) | (values[..., :half] & 0xF)
  return Quantized(values, scales, group, pack)


def unpack(q: Quantized) -> jax.Array:
  """One value per int8, [..., cols] (q.values itself when not packed)."""
  if not q.packed:
    return q.values
  return jnp.concatenate(nibbles(q.values), axis=-1).astype(jnp.int8)


def dequantize(q: Quantized) -> jax.Array:
  """values * scales as float32 (the fused kernel's in-block dequantization matches it)."""
  return dequantize_values(q.values, q.scales, q.group, q.packed)


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

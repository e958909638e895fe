"""Fused dequantize-and-perturb for the zeroth-order client, as one Pallas kernel.

For a 2-D weight [rows, cols] (a rank-2 leaf, or one layer's slice of a stacked leaf) it computes

    w_eff = dequant(w) + h * (a * z + b * sum_k u_k dequant(V_k))

with z the key schedule's draw (cooperllm_jax.zoo.keys.slice_direction) in one of two layouts:

  'rows'  row i is jax.random.normal(fold_in(key, row_offset + i), (cols,)): a rank-2 leaf (an
          embedding table, a head kernel), whose leading-axis slices are its rows;
  'flat'  the block is rows [row_offset, row_offset + rows) of jax.random.normal(key, (R, cols)):
          one layer of a stacked leaf, drawn whole from key = fold_in(leaf_key, layer), so the
          counter is the element's flat index (row_offset + i) * cols + c (64-bit: hi, lo words).

The kernel generates z itself, block by block, with the same threefry2x32 bits, so neither z nor
the dequantized weights ever exist in HBM: one pass reads int8 (or packed int4) weights and basis
and writes the perturbed float weights. Its integer work is uint32 add, multiply, xor, shifts and
an unsigned compare (the 64-bit counter in 16-bit limbs), which Mosaic TPU and Triton both lower.

z is bit-identical to jax.random.normal under `jax_threefry_partitionable=True`, the default since
jax 0.5 (and the only behaviour once the flag is gone); with the flag off jax lays the counters out
differently and `fused_perturb` raises rather than return other bits.

Backends. `jax.lax.platform_dependent` picks the kernel's form when the program is lowered, not
when it is traced, so one traced program lowers for any platform (`jax.export` for TPU or CUDA
works from a CPU host; tests/test_lowering.py checks that it does):

  TPU  Mosaic. The scalars (key words, row offset; h, a, b, u) go through scalar prefetch into
       SMEM, as Mosaic wants scalars; the grid is parallel on both axes (megacore).
  GPU  Triton, asked for with pallas.triton.CompilerParams rather than left to jax's default.
       Mosaic GPU brings TMA copies, warpgroup matmuls and shared-memory pipelines, none of which
       a streaming elementwise pass uses, and it requires what this kernel does not fit: copies
       of whole multiples of 128 bytes (the 16-byte scalar arrays are not) and every block staged
       in shared memory. It also needs Hopper or newer (sm_90a); Triton runs on Ampere too, and
       on ROCm. The scalars are whole-array blocks (Triton has no scalar prefetch).
  CPU  The Pallas interpreter.

Blocks are powers of two of at least (8, 128) rows x columns: Mosaic's tiling rule (a block's last
two dims multiples of (8, 128), or the array's) and Triton's (power-of-two sizes) at once. A block
may overhang a small array; both backends mask the edge. Quantization scales are laid out as
[column blocks, rows, groups per block] outside the kernel (an XLA transpose of the scales, 1/group
of the values' elements), so that their blocks obey the same rule.
"""

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


def nibbles(values):
  """(low, high) signed 4-bit halves of packed int8 values, as int32: column c < cols / 2 in the
  low nibble, column c + cols / 2 in the high one (zoo/quantized.py's packing)."""
  v = values.astype(jnp.int32)
  return jax.lax.shift_right_arithmetic(jax.lax.shift_left(v, 28), 28), v >> 4


def dequantize_values(values, scales, group: int, packed: bool = False) -> jax.Array:
  """values * scales (one scale per `group` columns) as float32, the packed int4 layout unpacked:
  the reference the kernel's in-block dequantization matches."""
  if packed:
    values = jnp.concatenate(nibbles(values), axis=-1)
  v = values.astype(jnp.float32)
  g = v.reshape(*v.shape[:-1], v.shape[-1] // group, group)
  return (g * scales[..., None]).reshape(v.shape)


# --- threefry2x32 and jax.random.normal, written out so they can run inside a kernel ------------

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_ONE_BITS = np.uint32(0x3F800000)  # float32 1.0
_LO = np.nextafter(np.float32(-1.0), np.float32(0.0))  # normal's uniform lives in (-1, 1)
_SPAN = np.float32(1.0) - _LO  # maxval - minval, rounded in float32 as jax does (== 2.0)
_SQRT2 = np.float32(np.sqrt(2.0))


def _rotl(x, r):
  return jax.lax.shift_left(x, np.uint32(r)) | jax.lax.shift_right_logical(x, np.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1):
  """The Threefry-2x32 block cipher (20 rounds) on broadcastable uint32 arrays, as jax's
  threefry2x32 primitive: key (k0, k1), counter (x0, x1) -> two uint32 words."""
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for n in range(5):
    for r in _ROTATIONS[n % 2]:
      x0 = x0 + x1
      x1 = x0 ^ _rotl(x1, r)
    x0 = x0 + ks[(n + 1) % 3]
    x1 = x1 + ks[(n + 2) % 3] + np.uint32(n + 1)
  return x0, x1


def _normal_at(k0, k1, hi, lo):
  """float32 N(0,1) samples of key data (k0, k1) at 64-bit counters (hi, lo), uint32 arrays
  broadcasting to the block: jax.random.normal(key, shape) at flat index hi * 2^32 + lo.

  random_bits(key, 32, shape) at flat index n is the xor of threefry(key, (hi(n), lo(n))) (the
  partitionable layout); uniform keeps the top 23 bits as the mantissa of a float in [1, 2), maps
  it to [lo, 1) with lo = nextafter(-1, 0); normal = sqrt(2) * erfinv(u).
  """
  b0, b1 = threefry2x32(k0, k1, hi, lo)
  mantissa = jax.lax.shift_right_logical(b0 ^ b1, np.uint32(32 - 23)) | _ONE_BITS
  f = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  u = jax.lax.max(_LO, f * _SPAN + _LO)
  return _SQRT2 * jax.lax.erf_inv(u)


def _normal_rows(k0, k1, rows, cols):
  """jax.random.normal(fold_in(key, row), (n,))[col]; fold_in(key, d) = threefry(key, (0, d))."""
  r0, r1 = threefry2x32(k0, k1, jnp.zeros_like(rows), rows)
  return _normal_at(r0, r1, jnp.zeros_like(cols), cols)


def _flat_index(rows, n: int, cols):
  """(hi, lo) uint32 words of the 64-bit rows * n + cols (rows, cols uint32 arrays; 0 <= n < 2^32),
  in 16-bit limbs: 32-bit arithmetic only, as GPUs and x64-less jax have."""
  mask = np.uint32(0xFFFF)
  shr = lambda x, k: jax.lax.shift_right_logical(x, np.uint32(k))
  r_lo, r_hi = rows & mask, shr(rows, 16)
  n_lo, n_hi = np.uint32(n & 0xFFFF), np.uint32(n >> 16)
  p0, p1, p2 = r_lo * n_lo, r_lo * n_hi, r_hi * n_lo
  mid = shr(p0, 16) + (p1 & mask) + (p2 & mask)
  lo = (p0 & mask) | jax.lax.shift_left(mid, np.uint32(16))
  hi = r_hi * n_hi + shr(p1, 16) + shr(p2, 16) + shr(mid, 16)
  out = lo + cols
  return hi + (out < lo).astype(jnp.uint32), out


def _check_threefry_layout():
  if not getattr(jax.config, 'jax_threefry_partitionable', True):
    raise NotImplementedError('fused_perturb reproduces jax.random.normal only with '
                              'jax_threefry_partitionable=True (the default since jax 0.5)')


# --- the kernel ---------------------------------------------------------------------------------

SUBLANES, LANES = 8, 128  # Mosaic TPU's (8, 128) tile: the least block rows and columns
BLOCK_ROWS, BLOCK_COLS = 32, 512  # the default block: int8's TPU tile of rows, 512 columns


class _Config(NamedTuple):
  """Everything static about one call (the custom_vjp's non-differentiable argument)."""
  rows: int
  cols: int
  block_rows: int
  block_cols: int
  w_group: Optional[int]  # None: float base weight
  w_packed: bool
  v_group: Optional[int]  # None: float basis (or none)
  v_packed: bool
  m: int                  # basis size (0: no basis)
  layout: str
  out_dtype: str
  interpret: Optional[bool]  # None: the interpreter on CPU, compiled on TPU and GPU


class _Backend(NamedTuple):
  """How one Pallas backend takes the kernel."""
  prefetch: bool  # scalars by scalar prefetch (SMEM), else as whole-array blocks
  compiler_params: Any
  interpret: bool


_MOSAIC_TPU = _Backend(True, pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL,) * 2),
                       False)
_TRITON = _Backend(False, pltriton.CompilerParams(num_warps=4, num_stages=1), False)
_INTERPRETER = _Backend(True, None, True)


def _pow2_ceil(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _is_pow2(n) -> bool:
  return isinstance(n, int) and n > 0 and not n & (n - 1)


def _fit(block: int, dim: int, tile: int) -> int:
  """The block size along a dim: `block`, or the dim's power-of-two ceiling (at least one tile)
  when the dim is smaller."""
  return min(block, max(tile, _pow2_ceil(dim)))


def _span(cfg: _Config, group: int) -> int:
  """Columns one row of a scales block covers: the block's, or the group holding it."""
  return max(cfg.block_cols, group)


def _scale_blocks(scales, group: int, cfg: _Config):
  """Scales [..., rows, G] as [..., L, rows, n]: n = span / group groups per column span, zero-
  padded to L whole spans, so that a block's scales are one (rows, n) tile."""
  n = _span(cfg, group) // group
  spans = pl.cdiv(cfg.cols, n * group)
  s = jnp.pad(scales, [(0, 0)] * (scales.ndim - 1) + [(0, spans * n - scales.shape[-1])])
  return jnp.moveaxis(s.reshape(*s.shape[:-1], spans, n), -2, -3)


def _scale_spec(cfg: _Config, group: int, lead: tuple):
  """BlockSpec of _scale_blocks' layout for value block (i, j). The index maps divide with lax.div
  and lax.rem (j >= 0): jnp's floor division adds a sign fix-up that Mosaic lowers only on a TPU
  host."""
  span = _span(cfg, group)
  return pl.BlockSpec((*(1,) * len(lead), 1, cfg.block_rows, span // group),
                      lambda i, j, *_: (*lead, jax.lax.div(j, span // cfg.block_cols), i, 0))


def _value_spec(cfg: _Config, packed: bool, lead: tuple):
  """BlockSpec of a values array: a packed one holds column blocks j and j + half in one block."""
  shape = (*(1,) * len(lead), cfg.block_rows, cfg.block_cols)
  if packed:
    half = cfg.cols // 2 // cfg.block_cols
    return pl.BlockSpec(shape, lambda i, j, *_: (*lead, i, jax.lax.rem(j, half)))
  return pl.BlockSpec(shape, lambda i, j, *_: (*lead, i, j))


def _expand(scales, group: int, shape):
  """Per-group scales [br, n] -> per-element [br, bc]."""
  br, bc = shape
  if scales.shape[-1] == 1:
    return jnp.broadcast_to(scales, shape)
  return jnp.broadcast_to(scales[:, :, None], (br, bc // group, group)).reshape(shape)


def _kernel(cfg: _Config, ints_ref, floats_ref, *refs):
  out_ref = refs[-1]
  refs = iter(refs[:-1])
  br, bc = cfg.block_rows, cfg.block_cols
  i, j = pl.program_id(0), pl.program_id(1)

  def read(lead):  # the next operand's block, its `lead` unit dims dropped
    return next(refs)[(0,) * lead + (slice(None),) * 2]

  def load(group, packed, lead):
    values = read(lead)
    if packed:  # column block j < half lives in the low nibbles
      low, high = nibbles(values)
      values = jnp.where(j < cfg.cols // 2 // bc, low, high)
    values = values.astype(jnp.float32)
    if group is None:
      return values
    return values * _expand(read(lead + 1), group, (br, bc))

  w = load(cfg.w_group, cfg.w_packed, 0)
  rows = (ints_ref[2] + (i * br).astype(jnp.uint32)
          + jax.lax.broadcasted_iota(jnp.int32, (br, 1), 0).astype(jnp.uint32))
  cols = (j * bc + jax.lax.broadcasted_iota(jnp.int32, (1, bc), 1)).astype(jnp.uint32)
  if cfg.layout == 'rows':
    z = _normal_rows(ints_ref[0], ints_ref[1], rows, cols)
  else:
    z = _normal_at(ints_ref[0], ints_ref[1], *_flat_index(rows, cfg.cols, cols))
  h, a, b = floats_ref[0], floats_ref[1], floats_ref[2]
  if cfg.m:
    g = floats_ref[3] * load(cfg.v_group, cfg.v_packed, 1)
    for k in range(1, cfg.m):
      g = g + floats_ref[3 + k] * load(cfg.v_group, cfg.v_packed, 1)
    step = a * z + b * g
  else:
    step = a * z
  out_ref[...] = (w + h * step).astype(out_ref.dtype)


def _pallas(cfg: _Config, backend: _Backend, ints, floats, arrays):
  """The kernel as `backend` runs it; arrays: w (and its scales), then V (and its scales)."""
  br, bc = cfg.block_rows, cfg.block_cols
  tiles = [_value_spec(cfg, cfg.w_packed, ())]
  if cfg.w_group is not None:
    tiles.append(_scale_spec(cfg, cfg.w_group, ()))
  for k in range(cfg.m):  # V passed once per basis vector: (1, br, bc) blocks, no m-sized block
    tiles.append(_value_spec(cfg, cfg.v_packed, (k,)))
    if cfg.v_group is not None:
      tiles.append(_scale_spec(cfg, cfg.v_group, (k,)))
  n_base = 1 if cfg.w_group is None else 2
  operands = [*arrays[:n_base], *list(arrays[n_base:]) * cfg.m]
  grid = (pl.cdiv(cfg.rows, br), pl.cdiv(cfg.cols, bc))
  out_spec = pl.BlockSpec((br, bc), lambda i, j, *_: (i, j))
  if backend.prefetch:
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=tiles,
                                             out_specs=out_spec)
  else:
    whole = [pl.BlockSpec(x.shape, lambda i, j: (0,)) for x in (ints, floats)]
    grid_spec = pl.GridSpec(grid=grid, in_specs=whole + tiles, out_specs=out_spec)
  return pl.pallas_call(
      functools.partial(_kernel, cfg),
      out_shape=jax.ShapeDtypeStruct((cfg.rows, cfg.cols), cfg.out_dtype),
      grid_spec=grid_spec,
      compiler_params=backend.compiler_params,
      interpret=backend.interpret,
      name='fused_perturb',
  )(ints, floats, *operands)


def _call(cfg: _Config, ints, floats, arrays):
  """The interpreter (interpret=True), or each platform's backend, picked at lowering."""
  if cfg.interpret:
    return _pallas(cfg, _INTERPRETER, ints, floats, arrays)
  run = lambda backend: functools.partial(_pallas, cfg, backend)
  triton = run(_TRITON)
  return jax.lax.platform_dependent(
      ints, floats, arrays, tpu=run(_MOSAIC_TPU), cuda=triton, rocm=triton,
      default=None if cfg.interpret is False else run(_INTERPRETER))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, ints, floats, *arrays):
  return _call(cfg, ints, floats, arrays)


def _fused_fwd(cfg, ints, floats, *arrays):
  return _call(cfg, ints, floats, arrays), None


def _fused_bwd(cfg, res, g):
  del cfg, res, g
  raise TypeError('fused_perturb has no gradient: it is the zeroth-order forward perturbation; '
                  'differentiate fused_perturb_reference instead')


_fused.defvjp(_fused_fwd, _fused_bwd)


def _split(x, scales, group, packed: bool, name: str, rank: int):
  """(arrays, group, packed, shape) of a float array, or of int8 values with their scales,
  checking rank and format; shape is the dequantized one."""
  x = jnp.asarray(x)
  if scales is None:
    if x.ndim != rank or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{name} must be float of rank {rank} (or int8 values with {name}_scales), '
                       f'got {x.dtype}{x.shape}')
    return [x], None, False, x.shape
  s = jnp.asarray(scales)
  shape = (*x.shape[:-1], 2 * x.shape[-1]) if packed else tuple(x.shape)
  if x.ndim != rank or x.dtype != jnp.int8:
    raise ValueError(f'{name} values must be int8 of rank {rank}, got {x.dtype}{x.shape}')
  if group is None or group < 1 or shape[-1] % group or s.shape != (*shape[:-1],
                                                                    shape[-1] // group):
    raise ValueError(f'{name}: group {group} must divide cols and {name}_scales must be '
                     f'{(*shape[:-1], shape[-1] // max(group or 1, 1))}, got {s.shape}')
  return [x, s.astype(jnp.float32)], group, packed, shape


def _key_data(leaf_key):
  if not jnp.issubdtype(leaf_key.dtype, jax.dtypes.prng_key) or leaf_key.shape:
    raise TypeError('leaf_key must be one typed key, jax.random.key(seed, impl="threefry2x32")')
  if str(jax.random.key_impl(leaf_key)) != 'threefry2x32':
    raise TypeError(f'leaf_key must be a threefry2x32 key, got {jax.random.key_impl(leaf_key)}')
  return jax.random.key_data(leaf_key)


LAYOUTS = ('rows', 'flat')


def fused_perturb(w, leaf_key, h, a, b, basis=None, u=None, *, w_scales=None, w_group=None,
                  w_packed: bool = False, basis_scales=None, basis_group=None,
                  basis_packed: bool = False, layout: str = 'rows', block_rows: int = BLOCK_ROWS,
                  block_cols: int = BLOCK_COLS, interpret: Optional[bool] = None,
                  row_offset=0, out_dtype=None) -> jax.Array:
  """dequant(w) + h * (a * z + b * sum_k u_k dequant(basis_k)), one fused pass, on plain arrays.

  w:          [rows, cols] float (f32, bf16, ...), or int8 values (with w_scales float32
              [rows, cols // w_group]; w_packed: two 4-bit values per byte, [rows, cols / 2]);
  leaf_key:   a threefry2x32 key; with layout 'rows' the leaf's key (keys.leaf_key), z row i drawn
              from fold_in(leaf_key, row_offset + i); with 'flat' the key of the whole 2-D draw
              (fold_in(leaf_key, layer) for a layer of a stacked leaf), see the module docstring;
  h, a, b:    float32 scalars (may be traced);
  basis, u:   [m, rows, cols] float (or int8 values with basis_scales, basis_group,
              basis_packed as for w), and float32 [m]; both or neither;
  block_rows, block_cols: powers of two, at least 8 and 128 (see the module docstring); a dim
              smaller than its block gets its power-of-two ceiling (at least 8 or 128). With a
              quantized w or basis the block's columns must be a multiple or a divisor of its
              group, and with packed values divide cols / 2. Ragged edge blocks are fine
              otherwise: every element depends only on its own (row, col);
  interpret:  None: the Pallas interpreter on CPU and the compiled kernel on TPU and GPU, chosen
              when the program is lowered; True: the interpreter everywhere; False: compiled only
              (a CPU program fails to lower);
  row_offset: int (may be traced), the first row's index in the leaf (or in the 'flat' draw);
  out_dtype:  None: float32 for a quantized w, w's dtype for a float one.

  Returns out_dtype [rows, cols]. Under jax.vmap any argument may be batched (e.g. leaf_key, u,
  h per client; on TPU batched scalars run the kernel once per batch element). No gradient: the
  ZO client only runs it forward, and jax.grad through it raises rather than silently returning
  zero.
  """
  _check_threefry_layout()
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  base, w_group, w_packed, (rows, cols) = _split(w, w_scales, w_group, w_packed, 'w', 2)
  if (basis is None) != (u is None):
    raise ValueError('pass both basis and u, or neither')
  if basis is not None:
    v_arrays, v_group, v_packed, v_shape = _split(basis, basis_scales, basis_group, basis_packed,
                                                  'basis', 3)
    u = jnp.asarray(u, jnp.float32)
    if v_shape[1:] != (rows, cols) or u.shape != v_shape[:1]:
      raise ValueError(f'basis must be [m, {rows}, {cols}] and u [m], got {v_shape} and {u.shape}')
    m = v_shape[0]
  else:
    v_arrays, v_group, v_packed, m, u = [], None, False, 0, jnp.zeros((0,), jnp.float32)
  if not (_is_pow2(block_rows) and _is_pow2(block_cols) and block_rows >= SUBLANES
          and block_cols >= LANES):
    raise ValueError(f'block_rows and block_cols must be powers of two, at least {SUBLANES} and '
                     f'{LANES}, got {block_rows}, {block_cols}')
  packed = w_packed or v_packed
  bc = _fit(block_cols, cols // 2 if packed else cols, LANES)
  for group in (w_group, v_group):
    if group is not None and bc % group and group % bc:
      raise ValueError(f'block_cols {bc} must be a multiple or a divisor of the group {group}')
  if packed and (cols // 2) % bc:
    raise ValueError(f'with packed values cols / 2 = {cols // 2} must be a multiple of the '
                     f'block\'s {bc} columns')
  if out_dtype is None:
    out_dtype = jnp.float32 if w_group is not None else base[0].dtype
  cfg = _Config(rows, cols, _fit(block_rows, rows, SUBLANES), bc, w_group, w_packed, v_group,
                v_packed, m, layout, jnp.dtype(out_dtype).name, interpret)
  if w_group is not None:
    base[1] = _scale_blocks(base[1], w_group, cfg)
  if v_group is not None:
    v_arrays[1] = _scale_blocks(v_arrays[1], v_group, cfg)
  kd = _key_data(leaf_key)  # kernel scalars: ints = key data, row_offset; floats = h, a, b, u
  ints = jnp.stack([kd[0], kd[1], jnp.asarray(row_offset, jnp.int32).astype(jnp.uint32),
                    jnp.uint32(0)])
  scalars = [jnp.asarray(x, jnp.float32) for x in (h, a, b)]
  floats = jnp.concatenate([jnp.stack(scalars), u])
  floats = jnp.pad(floats, (0, _pow2_ceil(floats.shape[0]) - floats.shape[0]))  # pow2: Triton
  return _fused(cfg, ints, floats, *base, *v_arrays)


def fused_perturb_reference(w, leaf_key, h, a, b, basis=None, u=None, *, w_scales=None,
                            w_group=None, w_packed: bool = False, basis_scales=None,
                            basis_group=None, basis_packed: bool = False, layout: str = 'rows',
                            row_offset=0, out_dtype=None):
  """fused_perturb in plain jnp, z from jax.random.normal (the key schedule's own draw); with
  layout 'flat' row_offset must be a Python int."""
  quantized = w_scales is not None
  wf = dequantize_values(w, w_scales, w_group, w_packed) if quantized else jnp.asarray(w)
  if out_dtype is None:
    out_dtype = jnp.float32 if quantized else wf.dtype
  rows, cols = wf.shape
  if layout == 'flat':
    z = jax.random.normal(leaf_key, (row_offset + rows, cols), jnp.float32)[row_offset:]
  else:
    idx = jnp.asarray(row_offset, jnp.int32) + jnp.arange(rows, dtype=jnp.int32)
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(leaf_key, i.astype(jnp.uint32)),
                                             (cols,), jnp.float32))(idx)
  step = a * z
  if basis is not None:
    vf = (dequantize_values(basis, basis_scales, basis_group, basis_packed)
          if basis_scales is not None else jnp.asarray(basis, jnp.float32))
    u = jnp.asarray(u, jnp.float32)
    g = u[0] * vf[0]
    for k in range(1, vf.shape[0]):
      g = g + u[k] * vf[k]
    step = step + b * g
  return (wf.astype(jnp.float32) + h * step).astype(out_dtype)

"""DTC: the codec and bit allocator of the guidance downlink.

The cloud sends a basis V each round: the trainable tree's structure, each leaf [m, *param_shape]
float32. A leaf is coded one basis vector (leading-axis row) at a time: the row is flattened to n
values, optionally sparsified to its k largest |x|, and the c (= n or k) values are cut into
ceil(c / block) blocks, the last one ragged. Each block gets one float32 scale s = absmax / qmax and
integer codes q in [-qmax, qmax]: int8 qmax = 127, int4 qmax = 7, ternary qmax = 1.

Ternary uses the same absmax scale (levels {-s, 0, s}) rather than mean |x|: with s = absmax every
x / s lies in [-1, 1], so stochastic rounding is exactly unbiased and round-to-nearest is off by at
most s / 2 = absmax / 2 per element. A mean-|x| scale has lower MSE on Gaussian-like blocks but must
clip the values above it, which biases stochastic rounding.

Wire format of one leaf (R rows, c values per row, nb = ceil(c / block) blocks per row), all
little-endian, rows concatenated in order; this is what `encoded_bytes` counts and `pack` writes:

  values   f32: 4 R c | int8: R c | int4: ceil(R c / 2) (two's-complement nibbles, low first)
           ternary: ceil(R c / 5) (base-3 digits q + 1, 5 per byte: 3^5 = 243 <= 256, 1.6 bit)
  scales   4 R nb float32 (none for f32)
  indices  w R c with top-k, w = 1 if n <= 2^8, 2 if n <= 2^16, else 4 (unsigned, row-local)

Padding of the last block is never sent: the receiver knows (shape, codec) and so c and nb.
"""

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.models.spec import path_hash, path_str

FORMATS = ('f32', 'int8', 'int4', 'ternary')
# Guidance 'formats' that allocate one of FORMATS per leaf each round under a byte budget: a given
# budget, or the one the run's simulated links allow (system/clock.py: guidance_budget).
ALLOCATIONS = ('adaptive', 'link')
QMAX = {'int8': 127, 'int4': 7, 'ternary': 1}
ERRORS = ('relative', 'absolute')


class Encoded(NamedTuple):
  """One coded leaf (a pytree; shapes are static functions of (codec, leaf shape)).

  values:  [R, c] float32 (f32) or int8 codes (in memory one byte per code; the wire packs them);
  scales:  [R, nb] float32, None for f32;
  indices: [R, c] int32 positions in the flattened row, None without top-k.
  """
  values: jax.Array
  scales: Optional[jax.Array]
  indices: Optional[jax.Array]


def _rows(shape) -> tuple[int, int]:
  """(R, n): the leading axis holds the basis vectors; a rank-0 leaf is one row of one value."""
  shape = tuple(shape)
  return (shape[0] if shape else 1), math.prod(shape[1:])


def _index_width(n: int) -> int:
  return 1 if n <= 1 << 8 else 2 if n <= 1 << 16 else 4


@dataclasses.dataclass(frozen=True)
class LeafCodec:
  """How one leaf is coded; hashable, so it can be a static argument of jit."""
  fmt: str
  block: int = 256
  topk: Optional[float] = None
  stochastic: bool = True

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ConfigError(f'unknown guidance format {self.fmt!r}; choose one of {FORMATS}')
    if not isinstance(self.block, int) or self.block < 1:
      raise ConfigError(f'codec block must be an integer >= 1, got {self.block!r}')
    if self.topk is not None and not 0 < self.topk <= 1:
      raise ConfigError(f'codec topk must be in (0, 1], got {self.topk!r}')

  def count(self, n: int) -> int:
    """c: values sent per row of n; top-k keeps max(1, round(topk * n)) (Python round)."""
    if self.topk is None or n == 0:
      return n
    return min(n, max(1, round(self.topk * n)))

  def nbytes(self, shape: Sequence[int]) -> int:
    return encoded_bytes(self, shape)

  def encode(self, x: jax.Array, key: Optional[jax.Array] = None) -> Encoded:
    """Codes x [R, ...]; `key` drives stochastic rounding (unused, may be None, when not stochastic).

    Stochastic rounding sends floor(y) + 1 with probability frac(y), y = x / s, so E[decoded] = x
    for every kept value; top-k itself is a biased (contractive) compressor.
    """
    x = jnp.asarray(x, jnp.float32)
    r, n = _rows(x.shape)
    vals = x.reshape(r, n)
    idx = None
    if self.topk is not None:
      # Descending |x| order also groups similar magnitudes into a block: tighter scales.
      _, idx = jax.lax.top_k(jnp.abs(vals), self.count(n))
      vals = jnp.take_along_axis(vals, idx, axis=1)
    if self.fmt == 'f32':
      return Encoded(vals, None, idx)
    if self.stochastic and key is None:
      raise ValueError('stochastic rounding needs a key')
    c = vals.shape[1]
    nb = -(-c // self.block)
    qmax = QMAX[self.fmt]
    blocks = jnp.pad(vals, ((0, 0), (0, nb * self.block - c))).reshape(r, nb, self.block)
    scales = jnp.max(jnp.abs(blocks), axis=-1) / qmax  # zero padding never raises absmax
    y = blocks / jnp.where(scales > 0, scales, 1.0)[..., None]
    if self.stochastic:
      low = jnp.floor(y)
      # frac = y - floor(y) is exact in float32, so P(up) = frac to within the uniform's 2^-23 grid.
      q = low + (jax.random.uniform(key, y.shape, jnp.float32) < y - low)
    else:
      q = jnp.round(y)
    q = jnp.clip(q, -qmax, qmax).astype(jnp.int8).reshape(r, nb * self.block)[:, :c]
    return Encoded(q, scales, idx)

  def decode(self, enc: Encoded, shape: Sequence[int]) -> jax.Array:
    """The float32 leaf of `shape` (dropped top-k entries are zero)."""
    shape = tuple(shape)
    r, n = _rows(shape)
    vals = jnp.asarray(enc.values)
    if self.fmt != 'f32':
      c = vals.shape[1]
      nb = -(-c // self.block)
      q = jnp.pad(vals.astype(jnp.float32), ((0, 0), (0, nb * self.block - c)))
      vals = (q.reshape(r, nb, self.block) * jnp.asarray(enc.scales)[..., None])
      vals = vals.reshape(r, nb * self.block)[:, :c]
    if enc.indices is not None:
      vals = jnp.zeros((r, n), jnp.float32).at[jnp.arange(r)[:, None], enc.indices].set(vals)
    return vals.reshape(shape)

  def pack(self, enc: Encoded, shape: Sequence[int]) -> bytes:
    """The wire bytes of `enc` (see the module docstring); len == nbytes(shape)."""
    r, n = _rows(shape)
    q = np.asarray(enc.values).reshape(-1)
    if self.fmt == 'f32':
      out = [q.astype('<f4').tobytes()]
    elif self.fmt == 'int8':
      out = [q.astype(np.int8).tobytes()]
    elif self.fmt == 'int4':
      nib = np.zeros(-(-q.size // 2) * 2, np.uint8)
      nib[:q.size] = q.astype(np.int8).view(np.uint8) & 0xF
      out = [(nib[0::2] | (nib[1::2] << 4)).tobytes()]
    else:
      digits = np.zeros(-(-q.size // 5) * 5, np.uint8)
      digits[:q.size] = q + 1
      out = [(digits.reshape(-1, 5) * np.array([1, 3, 9, 27, 81], np.uint8)).sum(
          axis=1, dtype=np.uint8).tobytes()]
    if self.fmt != 'f32':
      out.append(np.asarray(enc.scales).astype('<f4').tobytes())
    if self.topk is not None:
      out.append(np.asarray(enc.indices).astype(f'<u{_index_width(n)}').tobytes())
    data = b''.join(out)
    assert len(data) == self.nbytes(shape), (len(data), self.nbytes(shape))
    return data

  def unpack(self, data: bytes, shape: Sequence[int]) -> Encoded:
    """Inverse of pack: numpy arrays with the dtypes and shapes `encode` gives."""
    if len(data) != self.nbytes(shape):
      raise ValueError(f'{len(data)} bytes for a {self.fmt} leaf of shape {tuple(shape)}, '
                       f'expected {self.nbytes(shape)}')
    r, n = _rows(shape)
    c = self.count(n)
    nb = -(-c // self.block)
    size = r * c
    buf = np.frombuffer(data, np.uint8)
    nval = _value_bytes(self.fmt, size)
    raw, buf = buf[:nval], buf[nval:]
    if self.fmt == 'f32':
      values = raw.view('<f4').astype(np.float32)
    elif self.fmt == 'int8':
      values = raw.view(np.int8)
    elif self.fmt == 'int4':
      nib = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[:size]
      values = ((nib ^ 8).astype(np.int8) - 8).astype(np.int8)  # sign-extend 4 bits
    else:
      digits = raw[:, None] // np.array([1, 3, 9, 27, 81], np.uint8) % 3
      values = digits.reshape(-1)[:size].astype(np.int8) - 1
    scales = indices = None
    if self.fmt != 'f32':
      scales, buf = buf[:4 * r * nb].view('<f4').astype(np.float32).reshape(r, nb), buf[4 * r * nb:]
    if self.topk is not None:
      indices = buf.view(f'<u{_index_width(n)}').astype(np.int32).reshape(r, c)
    return Encoded(values.reshape(r, c), scales, indices)


def _value_bytes(fmt: str, size: int) -> int:
  return {'f32': 4 * size, 'int8': size, 'int4': -(-size // 2), 'ternary': -(-size // 5)}[fmt]


def encoded_bytes(codec: LeafCodec, shape: Sequence[int]) -> int:
  """Exact wire bytes of a leaf of `shape`: packed values + float32 scales + top-k indices."""
  r, n = _rows(shape)
  c = codec.count(n)
  total = _value_bytes(codec.fmt, r * c)
  if codec.fmt != 'f32':
    total += 4 * r * -(-c // codec.block)
  if codec.topk is not None:
    total += _index_width(n) * r * c
  return total


def codec_of(codecs, path) -> LeafCodec:
  """codecs: one LeafCodec for every leaf, or a dict 'a/b/kernel' -> LeafCodec."""
  if isinstance(codecs, LeafCodec):
    return codecs
  name = path_str(path)
  if name not in codecs:
    raise ConfigError(f'no guidance codec for leaf {name!r}')
  return codecs[name]


def _leaf_key(key, path):
  return None if key is None else jax.random.fold_in(key, path_hash(path))


def encode_tree(tree, codecs, key: Optional[jax.Array] = None):
  """Encoded per leaf; leaf keys are fold_in(key, path_hash(path)), so leaves round independently."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: codec_of(codecs, p).encode(x, _leaf_key(key, p)), tree)


def decode_tree(encoded, codecs, like):
  """The float32 tree; `like` gives the structure and leaf shapes (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x, enc: codec_of(codecs, p).decode(enc, x.shape), like, encoded)


@functools.partial(jax.jit, static_argnums=0)
def _roundtrip(codec: LeafCodec, x, key):
  return codec.decode(codec.encode(x, key), x.shape)


def roundtrip_tree(tree, codecs, key: Optional[jax.Array] = None):
  """decode_tree(encode_tree(tree, codecs, key), codecs, tree): what the receiver holds, one jitted
  leaf at a time (compiled once per codec and leaf shape, however the allocation mixes them)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _roundtrip(codec_of(codecs, p), x, _leaf_key(key, p)), tree)


def tree_nbytes(like, codecs) -> int:
  """Exact wire bytes of the whole tree (the per-client downlink of one basis)."""
  return sum(codec_of(codecs, p).nbytes(x.shape)
             for p, x in jax.tree_util.tree_flatten_with_path(like)[0])


def budget_from_link(bandwidth_bytes_per_s: float, deadline_s: float) -> int:
  """Bytes a link delivers by the deadline: floor(bandwidth * deadline)."""
  if bandwidth_bytes_per_s <= 0 or deadline_s <= 0:
    raise ConfigError(f'link bandwidth and deadline must be > 0, got {bandwidth_bytes_per_s} B/s '
                      f'and {deadline_s} s')
  return int(math.floor(bandwidth_bytes_per_s * deadline_s))


class LeafChoice(NamedTuple):
  fmt: str
  nbytes: int
  error: float       # ||decode(encode(x)) - x||^2
  rel_error: float   # error / ||x||^2 (0 for an all-zero leaf)


class Allocation(NamedTuple):
  """codecs: path -> LeafCodec for encode_tree; report: path -> LeafChoice; objective: the sum the
  allocator minimized; exact: True if the multiple-choice knapsack was solved exactly."""
  codecs: dict
  report: dict
  nbytes: int
  objective: float
  exact: bool


@functools.partial(jax.jit, static_argnums=0)
def _roundtrip_error(codec: LeafCodec, x, key):
  return jnp.sum(jnp.square(_roundtrip(codec, x, key) - x))


def _pareto(options):
  """(bytes, cost, format index) options of one leaf without the dominated ones, bytes ascending."""
  kept = []
  for b, c, f in sorted(options):
    if not kept or c < kept[-1][1]:
      kept.append((b, c, f))
  return kept


def _exact(options, budget: int, limit: int):
  """Multiple-choice knapsack by Pareto frontiers: after each leaf, keep the partial allocations
  that no other beats on both bytes and cost. Exact (so the optimum never worsens as the budget
  grows); returns None if a frontier exceeds `limit` points (worst case it grows exponentially)."""
  fb, fc, back = np.zeros(1, np.int64), np.zeros(1), []
  for opts in options:
    cb = (fb[:, None] + np.array([o[0] for o in opts], np.int64)).ravel()
    cc = (fc[:, None] + np.array([o[1] for o in opts])).ravel()
    fits = np.flatnonzero(cb <= budget)
    order = fits[np.lexsort((cc[fits], cb[fits]))]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(cc[order])[:-1]])
    keep = order[cc[order] < best_before]
    if keep.size > limit:
      return None
    back.append(keep)
    fb, fc = cb[keep], cc[keep]
  j, choice = len(fb) - 1, []  # the frontier's last point: the lowest cost within the budget
  for keep, opts in zip(reversed(back), reversed(options)):
    j, o = divmod(int(keep[j]), len(opts))
    choice.append(o)
  return choice[::-1]


def _greedy(options, budget: int):
  """Start every leaf at its cheapest option, then repeatedly take the upgrade (to any better
  option of one leaf) with the largest cost reduction per extra byte among those that fit."""
  cur = [0] * len(options)
  left = budget - sum(o[0][0] for o in options)
  while True:
    best, move = 0.0, None
    for i, opts in enumerate(options):
      b0, c0, _ = opts[cur[i]]
      for j in range(cur[i] + 1, len(opts)):
        extra = opts[j][0] - b0
        if extra <= left and (c0 - opts[j][1]) / extra > best:
          best, move = (c0 - opts[j][1]) / extra, (i, j, extra)
    if move is None:
      return cur
    i, cur[i], extra = move
    left -= extra


def allocate(tree, budget_bytes: int, formats: Sequence[str] = FORMATS, block: int = 256,
             error: str = 'relative', stochastic: bool = True,
             exact_limit: int = 1 << 16, topk: Optional[float] = None) -> Allocation:
  """Picks one format per leaf minimizing the summed guidance error with total bytes <= budget
  (every format with the same `block` and `topk`).

  Each leaf is actually coded with each format (stochastic rounding with a fixed key when
  `stochastic`, else round-to-nearest) to measure its error. error='absolute' minimizes
  sum ||decode(encode(x)) - x||^2, the distortion of V itself; 'relative' minimizes the sum of
  per-leaf ||.||^2 / ||x||^2, so small-norm layers are not starved. Solved exactly (`_exact`)
  unless its frontier outgrows `exact_limit`, then greedily (`_greedy`); `exact` says which.
  """
  if error not in ERRORS:
    raise ConfigError(f'unknown allocation error {error!r}; choose one of {ERRORS}')
  if not formats:
    raise ConfigError('allocate needs at least one format')
  codecs = [LeafCodec(f, block, topk, stochastic) for f in formats]
  key = jax.random.key(0, impl='threefry2x32')
  names, measured, options = [], [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = jnp.asarray(x, jnp.float32)
    norm = float(np.sum(np.square(np.asarray(x, np.float64))))
    row = []
    for codec in codecs:
      err = float(_roundtrip_error(codec, x, _leaf_key(key, path)))
      row.append(LeafChoice(codec.fmt, codec.nbytes(x.shape), err, err / norm if norm else 0.0))
    names.append(path_str(path))
    measured.append(row)
    options.append(_pareto([(c.nbytes, c.rel_error if error == 'relative' else c.error, f)
                            for f, c in enumerate(row)]))
  floor_bytes = sum(o[0][0] for o in options)
  if floor_bytes > budget_bytes:
    raise ConfigError(f'guidance needs at least {floor_bytes} bytes (every leaf at its cheapest '
                      f'format), budget is {budget_bytes}')
  choice = _exact(options, budget_bytes, exact_limit)
  exact = choice is not None
  if not exact:
    choice = _greedy(options, budget_bytes)
  picked = [measured[i][options[i][j][2]] for i, j in enumerate(choice)]
  return Allocation(
      codecs={n: codecs[options[i][j][2]] for i, (n, j) in enumerate(zip(names, choice))},
      report=dict(zip(names, picked)),
      nbytes=sum(c.nbytes for c in picked),
      objective=sum(options[i][j][1] for i, j in enumerate(choice)),
      exact=exact)

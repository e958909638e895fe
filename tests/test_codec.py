"""DTC codec: rounding error bounds, unbiased stochastic rounding, exact bytes, allocation, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.system import codec as C

KEY = jax.random.key(0, impl='threefry2x32')
QUANT = ('int8', 'int4', 'ternary')


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed, impl='threefry2x32'), shape, jnp.float32)


def _elementwise_scale(codec, enc, c):
  """The scale each of the c values per row was coded with, [R, c]."""
  return np.repeat(np.asarray(enc.scales), codec.block, axis=1)[:, :c]


@pytest.mark.parametrize('fmt', QUANT)
def test_round_to_nearest_error_within_half_a_step(fmt):
  codec = C.LeafCodec(fmt, block=64, stochastic=False)
  x = _x((3, 10, 30)) * jnp.linspace(0.1, 10.0, 300).reshape(10, 30)  # 300 = 4 blocks + 44
  enc = codec.encode(x)
  err = np.abs(np.asarray(codec.decode(enc, x.shape) - x)).reshape(3, 300)
  s = _elementwise_scale(codec, enc, 300)
  assert np.all(err <= s / 2 + 1e-6 * np.abs(np.asarray(x)).reshape(3, 300))
  # The absmax of every block is exactly representable (code +-qmax).
  assert np.all(np.abs(np.asarray(enc.values)).max(axis=1) == C.QMAX[fmt])


def test_f32_and_topk_keep_values_exactly():
  x = _x((2, 50))
  assert np.array_equal(C.LeafCodec('f32').decode(C.LeafCodec('f32').encode(x), x.shape), x)
  codec = C.LeafCodec('f32', topk=0.2)
  y = np.asarray(codec.decode(codec.encode(x), x.shape))
  kept = y != 0
  assert np.all(kept.sum(axis=1) == 10)
  assert np.array_equal(y[kept], np.asarray(x)[kept])
  ax = np.abs(np.asarray(x))
  for r in range(2):  # the dropped values are the smallest |x| of their row
    assert ax[r][~kept[r]].max() <= ax[r][kept[r]].min()


@pytest.mark.parametrize('fmt', QUANT)
def test_stochastic_rounding_is_unbiased(fmt):
  codec = C.LeafCodec(fmt, block=32)
  x = _x((1, 200), seed=1)
  keys = jax.random.split(jax.random.key(7, impl='threefry2x32'), 512)
  dec = jax.vmap(lambda k: codec.decode(codec.encode(x, k), x.shape))(keys)
  dec = np.asarray(dec, np.float64)
  n = dec.shape[0]
  x = np.asarray(x, np.float64)[0]
  scale = _elementwise_scale(codec, codec.encode(x[None], KEY), 200)[0].astype(np.float64)
  p = np.mod(x / scale, 1.0)  # P(round up); the rounded value has variance scale^2 p (1 - p)
  se = scale * np.sqrt(p * (1 - p) / n) + 1e-6 * (np.abs(x) + scale)  # + float32 rounding
  bias = dec.mean(axis=0)[0] - x
  assert np.max(np.abs(bias / se)) < 5.5  # per-element t-statistic, 200 elements
  # All elements together: the summed bias over its standard error (~N(0, 1) if unbiased).
  assert abs(bias.sum() / np.sqrt(np.sum(se ** 2))) < 4


def test_stochastic_rounding_error_below_one_step():
  codec = C.LeafCodec('int4', block=16)
  x = _x((4, 100))
  enc = codec.encode(x, KEY)
  err = np.abs(np.asarray(codec.decode(enc, x.shape) - x))
  assert np.all(err < _elementwise_scale(codec, enc, 100) + 1e-6 * np.abs(np.asarray(x)))


def test_stochastic_rounding_deterministic_per_key_and_path():
  codec = C.LeafCodec('int4', block=16)
  x = _x((2, 300))
  a, b = codec.encode(x, KEY), codec.encode(x, KEY)
  assert np.array_equal(a.values, b.values)
  assert not np.array_equal(a.values, codec.encode(x, jax.random.fold_in(KEY, 1)).values)
  enc = C.encode_tree({'p': x, 'q': x}, codec, KEY)  # same values, different leaf paths
  assert not np.array_equal(enc['p'].values, enc['q'].values)
  again = C.encode_tree({'p': x, 'q': x}, codec, KEY)
  assert np.array_equal(enc['q'].values, again['q'].values)


# (codec, shape, hand-computed bytes)
BYTE_CASES = [
    (C.LeafCodec('f32'), (3, 1000), 12000),
    (C.LeafCodec('int8'), (3, 1000), 3000 + 4 * 3 * 4),          # 4 blocks/row, last of 232
    (C.LeafCodec('int4'), (3, 1000), 1500 + 48),
    (C.LeafCodec('ternary'), (3, 1000), 600 + 48),
    (C.LeafCodec('int4', block=4), (1, 7), 4 + 8),               # odd count: one pad nibble
    (C.LeafCodec('ternary', block=4), (1, 7), 2 + 8),            # 7 trits -> 2 bytes
    (C.LeafCodec('int8', block=4), (5,), 5 + 5 * 4),             # rank 1: 5 rows of 1 value
    (C.LeafCodec('int8', block=16, topk=0.1), (2, 300), 60 + 16 + 2 * 60),  # k=30, u16 indices
    (C.LeafCodec('f32', topk=0.5), (2, 10, 10), 400 + 100),      # k=50, u8 indices
    (C.LeafCodec('ternary', topk=0.001), (4, 70000), 56 + 16 + 4 * 280),  # k=70, u32 indices
]


@pytest.mark.parametrize('codec,shape,expected', BYTE_CASES)
def test_bytes_exact_and_pack_round_trips(codec, shape, expected):
  assert codec.nbytes(shape) == C.encoded_bytes(codec, shape) == expected
  x = _x(shape, seed=2)
  enc = codec.encode(x, KEY)
  data = codec.pack(enc, shape)
  assert len(data) == expected
  back = codec.unpack(data, shape)
  for got, want in zip(back, enc):
    assert (got is None) == (want is None)
    if want is not None:
      assert got.dtype == want.dtype and np.array_equal(got, np.asarray(want))
  assert np.array_equal(codec.decode(back, shape), codec.decode(enc, shape))


def test_tree_nbytes_sums_leaves():
  tree = {'a': jnp.zeros((2, 3, 100)), 'b': {'c': jnp.zeros((2, 7))}}
  codecs = {'a': C.LeafCodec('int4', block=64), 'b/c': C.LeafCodec('f32')}
  assert C.tree_nbytes(tree, codecs) == (300 + 4 * 2 * 5) + 56
  with pytest.raises(ConfigError, match="'b/c'"):
    C.tree_nbytes(tree, {'a': C.LeafCodec('f32')})


def _guidance_tree():
  """Leaves of different sizes and shapes; 'outlier' has one huge value per row (bad for int4)."""
  o = np.array(_x((4, 500), seed=5))
  o[:, 0] = 100.0
  return {'layers': {'q': _x((4, 2, 64, 64), seed=3), 'bias': _x((4, 2, 64), seed=4)},
          'outlier': jnp.asarray(o), 'head': _x((4, 5), seed=6)}


def test_allocation_budget_extremes_and_monotone():
  tree = _guidance_tree()
  f32 = C.tree_nbytes(tree, C.LeafCodec('f32'))
  full = C.allocate(tree, 10 * f32)
  assert full.exact and {c.fmt for c in full.codecs.values()} == {'f32'}
  assert full.objective == 0 and full.nbytes == f32
  floor = sum(min(C.LeafCodec(f).nbytes(x.shape) for f in C.FORMATS) for x in jax.tree.leaves(tree))
  tight = C.allocate(tree, floor)
  assert {c.fmt for c in tight.codecs.values()} == {'ternary'} and tight.nbytes == floor
  with pytest.raises(ConfigError, match=f'at least {floor} bytes'):
    C.allocate(tree, floor - 1)
  previous = np.inf
  for budget in np.linspace(floor, f32, 25).astype(int):
    alloc = C.allocate(tree, int(budget), error='absolute')
    assert alloc.nbytes <= budget and alloc.nbytes == C.tree_nbytes(tree, alloc.codecs)
    assert alloc.objective <= previous
    assert alloc.objective == pytest.approx(sum(r.error for r in alloc.report.values()))
    previous = alloc.objective
  enc = C.encode_tree(tree, alloc.codecs, KEY)
  assert C.decode_tree(enc, alloc.codecs, tree)['head'].shape == (4, 5)


def test_greedy_fallback_respects_budget():
  tree = _guidance_tree()
  f32 = C.tree_nbytes(tree, C.LeafCodec('f32'))
  exact = C.allocate(tree, f32 // 3, exact_limit=1 << 16)
  greedy = C.allocate(tree, f32 // 3, exact_limit=0)
  assert exact.exact and not greedy.exact
  assert greedy.nbytes <= f32 // 3 and greedy.objective >= exact.objective - 1e-12
  assert {c.fmt for c in C.allocate(tree, f32, exact_limit=0).codecs.values()} == {'f32'}


def test_budget_from_link():
  assert C.budget_from_link(1e6, 0.25) == 250000
  with pytest.raises(ConfigError):
    C.budget_from_link(0, 1.0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(fmt='int2'), 'unknown guidance format'), (dict(fmt='int8', block=0), 'block'),
    (dict(fmt='int8', topk=0.0), 'topk'), (dict(fmt='int8', topk=1.5), 'topk')])
def test_bad_codec_is_one_line_error(kwargs, match):
  with pytest.raises(ConfigError, match=match) as info:
    C.LeafCodec(**kwargs)
  assert '\n' not in str(info.value)


def test_encode_decode_jit():
  tree = {'a': _x((3, 40, 9)), 'b': _x((3, 7))}
  codecs = {'a': C.LeafCodec('int4', block=32, topk=0.5), 'b': C.LeafCodec('ternary', block=4)}
  fn = jax.jit(lambda t, k: C.decode_tree(C.encode_tree(t, codecs, k), codecs, t))
  out, ref = fn(tree, KEY), C.decode_tree(C.encode_tree(tree, codecs, KEY), codecs, tree)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  enc = jax.jit(C.LeafCodec('int8').encode)(tree['a'], KEY)
  assert enc.values.dtype == jnp.int8 and enc.scales.shape == (3, 2)


def test_roundtrip_tree_is_decode_of_encode_and_allocate_takes_topk():
  tree = {'a': _x((2, 40)), 'b': _x((2, 7), seed=1)}
  alloc = C.allocate(tree, C.tree_nbytes(tree, C.LeafCodec('int8', 16, 0.5)), ('int8', 'int4'),
                     block=16, topk=0.5)
  assert {c.topk for c in alloc.codecs.values()} == {0.5}
  got = C.roundtrip_tree(tree, alloc.codecs, KEY)
  want = C.decode_tree(C.encode_tree(tree, alloc.codecs, KEY), alloc.codecs, tree)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)

"""Pallas kernels against their pure-jnp references: interpreted on CPU, compiled when a GPU or a
TPU is present (the blocks are ones both backends take: powers of two of at least 8 x 128)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax.kernels import fused_perturb as kernel
from cooperllm_jax.kernels.fused_perturb import _flat_index
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.quantized import Quantized, dequantize, quantize, unpack

PATH = 'layers/attn/q/kernel'


def _probe_key(probe=0):
  return keys_lib.address_key(7, (3, 1, 2, probe))


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


def _plain(fn):
  """fn (the kernel or its reference) taking Quantized w / basis: the kernels take plain arrays,
  int8 values with their scales, group and packing."""
  def call(w, leaf_key, h, a, b, basis=None, u=None, **kw):
    if isinstance(w, Quantized):
      kw.update(w_scales=w.scales, w_group=w.group, w_packed=w.packed)
      w = w.values
    if isinstance(basis, Quantized):
      kw.update(basis_scales=basis.scales, basis_group=basis.group, basis_packed=basis.packed)
      basis = basis.values
    return fn(w, leaf_key, h, a, b, basis, u, **kw)

  return call


fused_perturb, fused_perturb_reference = _plain(kernel.fused_perturb), _plain(
    kernel.fused_perturb_reference)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


class TestFusedPerturb:
  INTERPRET = True

  def call(self, *args, **kw):
    return fused_perturb(*args, interpret=self.INTERPRET, **kw)

  @pytest.mark.parametrize('rows,cols,block_rows,block_cols,row_offset', [
      (37, 96, 8, 128, 0),     # ragged row blocks, one block overhanging the columns
      (5, 384, 8, 128, 11),    # one partial row block, offset into the leaf
      (1, 7, 8, 128, 0),       # both edges ragged, cols not a multiple of anything
      (37, 300, 16, 128, 200),  # ragged column blocks too
  ])
  def test_z_bit_exact(self, rows, cols, block_rows, block_cols, row_offset):
    leaf = keys_lib.leaf_key(_probe_key(), PATH)
    run = jax.jit(lambda off: self.call(jnp.zeros((rows, cols)), leaf, 1.0, 1.0, 0.0,
                                        block_rows=block_rows, block_cols=block_cols,
                                        row_offset=off))
    z = run(jnp.int32(row_offset))  # a traced offset
    idx = row_offset + jnp.arange(rows, dtype=jnp.int32)
    want = keys_lib.slice_direction(_probe_key(), PATH, idx, (cols,))
    np.testing.assert_array_equal(_bits(z), _bits(want))

  @pytest.mark.parametrize('rows,cols,block_rows,block_cols,row_offset', [
      (37, 96, 8, 128, 0),    # ragged row blocks
      (5, 200, 8, 128, 3),    # ragged column blocks, offset into the draw
  ])
  def test_flat_z_bit_exact(self, rows, cols, block_rows, block_cols, row_offset):
    """A stacked leaf's layer slice is one normal draw from fold_in(leaf_key, layer)."""
    layer_key = jax.random.fold_in(keys_lib.leaf_key(_probe_key(), PATH), jnp.uint32(3))
    run = jax.jit(lambda off: self.call(jnp.zeros((rows, cols)), layer_key, 1.0, 1.0, 0.0,
                                        layout='flat', block_rows=block_rows,
                                        block_cols=block_cols, row_offset=off))
    z = run(jnp.int32(row_offset))
    want = keys_lib.slice_direction(_probe_key(), PATH, 3, (row_offset + rows, cols))[row_offset:]
    np.testing.assert_array_equal(_bits(z), _bits(want))

  def test_packed_int4_equals_unpacked(self):
    rows, cols, m = 13, 512, 2
    x, v = _normal(1, (rows, cols)), _normal(2, (m, rows, cols))
    w, wp = quantize(x, 32, bits=4), quantize(x, 32, bits=4, pack=True)
    basis, basis_p = quantize(v, 16, bits=4), quantize(v, 16, bits=4, pack=True)
    assert wp.values.shape == (rows, cols // 2) and wp.shape == (rows, cols)
    leaf, u = keys_lib.leaf_key(_probe_key(), PATH), _normal(3, (m,))
    args = (leaf, 0.05, 0.8, 0.6)
    out = self.call(wp, *args, basis_p, u, block_rows=8, block_cols=128)
    np.testing.assert_array_equal(out, self.call(w, *args, basis, u, block_rows=8, block_cols=128))
    np.testing.assert_allclose(out, fused_perturb_reference(wp, *args, basis_p, u), rtol=1e-6,
                               atol=1e-6)

  @pytest.mark.parametrize('w_bits,v_kind,m,w_group,v_group,block_cols', [
      (8, 'float', 1, 32, None, 128),  # 3 column blocks of 4 groups
      (8, 4, 4, 32, 384, 128),  # per-row basis scales (group = cols), blocks inside a group
      (4, 8, 4, 128, 32, 256),  # ragged column blocks (384 = 256 + 128)
      (4, 'float', 1, 32, None, 512),  # one block overhanging the row: scales padded
      (8, None, 0, 384, None, 128),
  ])
  def test_matches_reference_quantized(self, w_bits, v_kind, m, w_group, v_group, block_cols):
    rows, cols = 37, 384
    w = quantize(_normal(1, (rows, cols)), w_group, bits=w_bits)
    basis = u = None
    if m:
      v = _normal(2, (m, rows, cols))
      basis = v if v_kind == 'float' else quantize(v, v_group, bits=v_kind)
      u = _normal(3, (m,))
    leaf = keys_lib.leaf_key(_probe_key(), PATH)
    args = (w, leaf, 0.05, 0.8, 0.6, basis, u)
    out = self.call(*args, block_rows=16, block_cols=block_cols, row_offset=3)
    want = fused_perturb_reference(*args, row_offset=3)
    assert out.dtype == jnp.float32 and out.shape == (rows, cols)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)

  @pytest.mark.parametrize('dtype,out_dtype,layout', [(jnp.float32, None, 'rows'),
                                                      (jnp.bfloat16, None, 'flat'),
                                                      (jnp.bfloat16, jnp.float32, 'rows')])
  def test_matches_reference_float(self, dtype, out_dtype, layout):
    w = _normal(1, (20, 200)).astype(dtype)
    basis, u = _normal(2, (2, 20, 200)), _normal(3, (2,))
    leaf = keys_lib.leaf_key(_probe_key(), PATH)
    args = (w, leaf, 0.05, 0.8, 0.6, basis, u)
    kw = dict(layout=layout, out_dtype=out_dtype)
    out = self.call(*args, block_rows=8, block_cols=128, **kw)
    assert out.dtype == (out_dtype or dtype)
    np.testing.assert_allclose(out.astype(jnp.float32),
                               fused_perturb_reference(*args, **kw).astype(jnp.float32),
                               rtol=1e-6, atol=1e-6)

  def test_vmap_over_clients(self):
    rows, cols, m = 13, 64, 2
    w = quantize(_normal(1, (rows, cols)), 32)
    basis = quantize(_normal(2, (m, rows, cols)), 64)
    leaves = jnp.stack([keys_lib.leaf_key(_probe_key(p), PATH) for p in range(3)])
    us, hs = _normal(3, (3, m)), jnp.array([0.1, -0.2, 0.3])
    run = lambda k, u, h: self.call(w, k, h, 1.0, 0.5, basis, u, block_rows=8, block_cols=128)
    batched = jax.vmap(run)(leaves, us, hs)
    for c in range(3):
      np.testing.assert_allclose(batched[c], run(leaves[c], us[c], hs[c]), rtol=1e-6, atol=1e-6)

  def test_no_gradient(self):
    w, leaf = _normal(1, (8, 32)), keys_lib.leaf_key(_probe_key(), PATH)
    loss = lambda h: self.call(w, leaf, h, 1.0, 0.0, block_rows=8).sum()
    with pytest.raises(TypeError, match='no gradient'):
      jax.grad(loss)(0.1)


@pytest.mark.skipif(jax.default_backend() == 'cpu', reason='compiled Pallas needs a GPU or TPU')
class TestFusedPerturbCompiled(TestFusedPerturb):
  INTERPRET = False


def test_flat_index_is_the_64_bit_product():
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 2 ** 32, 1000, dtype=np.uint64)
  cols = rng.integers(0, 2 ** 32, 1000, dtype=np.uint64)
  for n in (1, 96, 49152, 2 ** 32 - 1):
    hi, lo = _flat_index(jnp.asarray(rows, jnp.uint32), n, jnp.asarray(cols, jnp.uint32))
    want = rows * np.uint64(n) + cols  # wraps mod 2^64 like the counter
    np.testing.assert_array_equal(np.asarray(hi), (want >> np.uint64(32)).astype(np.uint32))
    np.testing.assert_array_equal(np.asarray(lo), (want & np.uint64(2 ** 32 - 1)).astype(np.uint32))


@pytest.mark.parametrize('bits,group,pack', [(8, 16, False), (4, 16, False), (4, 48, False),
                                             (4, 16, True)])
def test_quantize_roundtrip(bits, group, pack):
  x = _normal(5, (6, 48)) * jnp.linspace(0.01, 3.0, 48)
  x = x.at[0, :group].set(0.0)  # an all-zero group
  q = quantize(x, group, bits=bits, pack=pack)
  assert q.values.dtype == jnp.int8 and q.scales.shape == (6, 48 // group)
  assert q.values.shape == (6, 24 if pack else 48) and q.shape == (6, 48)
  qmax = 2 ** (bits - 1) - 1
  codes = unpack(q)
  assert int(codes.min()) >= -qmax - 1 and int(codes.max()) <= qmax
  if pack:
    np.testing.assert_array_equal(codes, quantize(x, group, bits=bits).values)
  per_elem = np.repeat(np.asarray(q.scales), group, axis=-1)
  err = np.abs(np.asarray(dequantize(q)) - np.asarray(x))
  assert np.all(err <= per_elem / 2 * (1 + 1e-6) + 1e-12)
  assert np.all(np.asarray(dequantize(q))[0, :group] == 0)


def test_bad_input_is_one_clear_error():
  leaf = keys_lib.leaf_key(_probe_key(), PATH)
  w = jnp.zeros((8, 32))
  q = quantize(w, 16)
  cases = [
      (lambda: quantize(w, 5), ValueError, 'must divide'),
      (lambda: quantize(w, 16, bits=9), ValueError, 'bits'),
      (lambda: fused_perturb(jnp.zeros((8,)), leaf, 1., 1., 0.), ValueError, 'rank 2'),
      (lambda: fused_perturb(Quantized(q.values, q.scales, 5), leaf, 1., 1., 0.), ValueError,
       'group 5'),
      (lambda: fused_perturb(q, leaf, 1., 1., 0., block_cols=24), ValueError, 'powers of two'),
      (lambda: fused_perturb(q, leaf, 1., 1., 0., block_rows=12), ValueError, 'powers of two'),
      (lambda: fused_perturb(q, leaf, 1., 1., 0., block_cols=64), ValueError, 'at least'),
      (lambda: fused_perturb(q, leaf, 1., 1., 0., block_rows=4), ValueError, 'at least'),
      (lambda: fused_perturb(w, leaf, 1., 1., 0., layout='cols'), ValueError, 'layout'),
      (lambda: quantize(w, 16, bits=8, pack=True), ValueError, 'packing'),
      (lambda: fused_perturb(quantize(jnp.zeros((8, 384)), 16, bits=4, pack=True), leaf, 1., 1.,
                             0.), ValueError, 'cols / 2 = 192'),
      (lambda: fused_perturb(quantize(jnp.zeros((8, 48)), 24), leaf, 1., 1., 0.), ValueError,
       'multiple or a divisor'),
      (lambda: fused_perturb(w, leaf, 1., 1., 0., basis=jnp.zeros((2, 8, 32))), ValueError,
       'both basis and u'),
      (lambda: fused_perturb(w, leaf, 1., 1., 0., jnp.zeros((2, 8, 16)), jnp.zeros(2)),
       ValueError, 'basis must be'),
      (lambda: fused_perturb(w, jax.random.PRNGKey(0), 1., 1., 0.), TypeError, 'typed key'),
  ]
  for fn, err, match in cases:
    with pytest.raises(err, match=match):
      fn()


def test_non_partitionable_threefry_raises():
  leaf = keys_lib.leaf_key(_probe_key(), PATH)
  with jax.threefry_partitionable(False):
    with pytest.raises(NotImplementedError, match='jax_threefry_partitionable'):
      fused_perturb(jnp.zeros((8, 32)), leaf, 1., 1., 0.)


@pytest.mark.parametrize('layout', ['rows', 'flat'])
def test_gpu_form_matches_tpu_form(monkeypatch, layout):
  """The kernel's GPU form (scalars as whole-array blocks) gives the bits of its TPU form (scalar
  prefetch), both interpreted: they share the body and differ only in how the scalars arrive."""
  rows, cols, m = 21, 512, 2
  w = quantize(_normal(1, (rows, cols)), 32, bits=4, pack=True)
  basis, u = quantize(_normal(2, (m, rows, cols)), 64), _normal(3, (m,))
  leaf = keys_lib.leaf_key(_probe_key(), PATH)
  run = lambda: fused_perturb(w, leaf, 0.05, 0.8, 0.6, basis, u, layout=layout, block_rows=16,
                              block_cols=128, row_offset=5, interpret=True)
  tpu_form = run()
  monkeypatch.setattr(kernel, '_INTERPRETER', kernel._TRITON._replace(interpret=True))
  np.testing.assert_array_equal(run(), tpu_form)

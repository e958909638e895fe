"""Pallas kernels against their pure-jnp references: interpreted on CPU, compiled when a GPU is
present. Block sizes are powers of two so the same tests compile for GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax.zoo import keys as keys_lib
from kernels.fused_perturb import (Quantized, dequantize, fused_perturb, fused_perturb_reference,
                                   quantize)

PATH = 'layers/attn/q/kernel'


def _probe_key(probe=0):
  return keys_lib.address_key(7, (3, 1, 2, probe))


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


class TestFusedPerturb:
  INTERPRET = True

  def call(self, *args, **kw):
    return fused_perturb(*args, interpret=self.INTERPRET, **kw)

  @pytest.mark.parametrize('rows,cols,block_rows,block_cols,row_offset', [
      (37, 96, 8, 32, 0),     # ragged row blocks
      (5, 384, 8, 128, 11),   # one partial row block, offset into the leaf
      (1, 7, 8, 8, 0),        # both edges ragged, cols not a multiple of anything
      (37, 96, 16, 64, 200),  # ragged column blocks too
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

  @pytest.mark.parametrize('w_bits,v_kind,m,w_group,v_group,block_cols', [
      (8, 'float', 1, 32, None, 32),
      (8, 4, 4, 32, 96, 32),   # per-row basis scales (group = cols), blocks inside a group
      (4, 8, 4, 96, 32, 32),
      (4, 'float', 1, 32, None, 64),
      (8, None, 0, 96, None, None),
  ])
  def test_matches_reference_quantized(self, w_bits, v_kind, m, w_group, v_group, block_cols):
    rows, cols = 37, 96
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

  @pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
  def test_matches_reference_float(self, dtype):
    w = _normal(1, (20, 64)).astype(dtype)
    basis, u = _normal(2, (2, 20, 64)), _normal(3, (2,))
    leaf = keys_lib.leaf_key(_probe_key(), PATH)
    args = (w, leaf, 0.05, 0.8, 0.6, basis, u)
    out = self.call(*args, block_rows=8, block_cols=32)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(jnp.float32),
                               fused_perturb_reference(*args).astype(jnp.float32),
                               rtol=1e-6, atol=1e-6)

  def test_vmap_over_clients(self):
    rows, cols, m = 13, 64, 2
    w = quantize(_normal(1, (rows, cols)), 32)
    basis = quantize(_normal(2, (m, rows, cols)), 64)
    leaves = jnp.stack([keys_lib.leaf_key(_probe_key(p), PATH) for p in range(3)])
    us, hs = _normal(3, (3, m)), jnp.array([0.1, -0.2, 0.3])
    run = lambda k, u, h: self.call(w, k, h, 1.0, 0.5, basis, u, block_rows=8, block_cols=32)
    batched = jax.vmap(run)(leaves, us, hs)
    for c in range(3):
      np.testing.assert_allclose(batched[c], run(leaves[c], us[c], hs[c]), rtol=1e-6, atol=1e-6)

  def test_no_gradient(self):
    w, leaf = _normal(1, (8, 32)), keys_lib.leaf_key(_probe_key(), PATH)
    loss = lambda h: self.call(w, leaf, h, 1.0, 0.0, block_rows=8).sum()
    with pytest.raises(TypeError, match='no gradient'):
      jax.grad(loss)(0.1)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiled Pallas needs a GPU')
class TestFusedPerturbCompiled(TestFusedPerturb):
  INTERPRET = False


@pytest.mark.parametrize('bits,group', [(8, 16), (4, 16), (4, 48)])
def test_quantize_roundtrip(bits, group):
  x = _normal(5, (6, 48)) * jnp.linspace(0.01, 3.0, 48)
  x = x.at[0, :group].set(0.0)  # an all-zero group
  q = quantize(x, group, bits=bits)
  assert q.values.dtype == jnp.int8 and q.scales.shape == (6, 48 // group)
  qmax = 2 ** (bits - 1) - 1
  assert int(q.values.min()) >= -qmax - 1 and int(q.values.max()) <= qmax
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
      (lambda: fused_perturb(quantize(jnp.zeros((8, 48)), 24), leaf, 1., 1., 0., block_cols=32),
       ValueError, 'multiple or a divisor'),
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

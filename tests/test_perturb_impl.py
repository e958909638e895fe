"""The client's forward perturbation through the fused Pallas kernel, and frozen base weights kept
quantized: the same z bit for bit as XLA's path, the same client updates within float tolerance.

The kernel runs in interpret mode on CPU and compiled on a GPU (Perturbation lets fused_perturb pick
by backend), so these tests exercise whichever the machine has. Models are tiny: interpreting the
kernel inside the layer scan is slow on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax import zoo
from cooperllm_jax.cloud import pool as pool_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import clients as fzo
from cooperllm_jax.memory import compiled_memory
from cooperllm_jax.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.models.spec import is_spec
from cooperllm_jax.zoo import guided, quantized
from cooperllm_jax.zoo.perturb import Perturbation
from cooperllm_jax.zoo.quantized import Quantized

ENCODER = Encoder(EncoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, max_positions=16, num_labels=3,
                                type_vocab_size=0, pooling='mean'))
DECODER = Decoder(DecoderConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, intermediate_size=64,
                                tie_embeddings=False, label_token_ids=(3, 5, 7)))
SEED, ROUND, CLIENT, LR = 7, 2, 5, 1e-2


def _params(model, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32),
                      model.specs(), is_leaf=is_spec)


def _batches(model, steps=2, batch=2, seq=8, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, model.cfg.vocab_size, (steps, batch, seq)).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids),
          'labels': rng.integers(0, 3, (steps, batch)).astype(np.int32)}


def _guide(trainable, m=2, alpha=0.5, seed=3):
  rng = np.random.default_rng(seed)
  pool = pool_lib.Pool(jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal((m,) + x.shape), jnp.float32), trainable),
                       jnp.int32(m))
  return guided.make_guidance(*pool_lib.orthonormalize(pool), alpha)


def _client(model, mode, impl, base='f32', guide=True):
  """One client's 2 local steps: (local trainable, uplink scalars)."""
  subset = zoo.Subset(mode, lora_rank=4)
  trainable, frozen = subset.split(_params(model), jax.random.key(1))
  frozen = quantized.quantize_frozen(frozen, base, group=16)
  est = zoo.Estimator(eps=1e-2, probes=1, perturb_impl=impl)
  update = jax.jit(fzo.make_client_update(make_loss(model), est, subset))
  kw = {'guide': _guide(trainable)} if guide else {}
  local, up, _ = update(trainable, frozen, _batches(model), SEED, ROUND, CLIENT, LR, **kw)
  return local, up.scalars


def _assert_same_update(a, b):
  (ta, ga), (tb, gb) = a, b
  # The scalars are loss differences over 2 eps: float rounding of the forward shows up ~100x.
  np.testing.assert_allclose(ga, gb, rtol=1e-3, atol=1e-4)
  for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


class TestPallasPerturbation:

  @pytest.mark.parametrize('model,path,layer', [
      (ENCODER, ('layers', 'mlp', 'up', 'kernel'), 1),   # a stacked leaf's layer: 'flat' layout
      (ENCODER, ('head', 'classifier', 'kernel'), None),  # a rank-2 leaf: 'rows' layout
      (DECODER, ('lm_head', 'kernel'), None)])
  def test_z_is_the_key_schedule_draw_bitwise(self, model, path, layer):
    leaf = _params(model)
    for name in path:
      leaf = leaf[name]
    x = jnp.zeros(leaf.shape[1:] if layer is not None else leaf.shape)
    key = zoo.address_key(SEED, (ROUND, CLIENT, 0, 0))
    pert = Perturbation(frozenset(['/'.join(path)]), key, 1.0, impl='pallas')
    z = pert._perturb(path, x, None if layer is None else jnp.int32(layer))  # pylint: disable=protected-access
    want = guided.direction(key, path, x.shape, layer)
    np.testing.assert_array_equal(np.asarray(z).view(np.uint32), np.asarray(want).view(np.uint32))

  @pytest.mark.parametrize('model,mode,base', [
      (ENCODER, 'head', 'int8'),   # rank-2 head kernel ('rows') over an int8 body
      pytest.param(DECODER, 'full', 'f32', marks=pytest.mark.slow),  # every layer ('flat'),
                                                                     # lm_head, embedding rows
      pytest.param(DECODER, 'lora', 'int4', marks=pytest.mark.slow)])  # adapters over int4 kernels
  def test_guided_client_update_matches_xla(self, model, mode, base):
    _assert_same_update(_client(model, mode, 'pallas', base), _client(model, mode, 'xla', base))


def test_quantized_base_is_dequantized_a_layer_and_a_row_at_a_time():
  """Through the hooks, quantized frozen weights give the loss of their dequantized values; XLA
  keeps the quantized model (int4: ~1/6 of float32) plus a layer's float weights, not a float copy."""
  trainable, frozen = zoo.Subset('head').split(_params(DECODER))
  loss = make_loss(DECODER)
  batch = jax.tree.map(lambda x: x[0], _batches(DECODER))
  step = zoo.make_zo_step(loss, zoo.Estimator())
  keys = zoo.address_keys(0, jnp.zeros((1, 4), jnp.int32))
  peaks = {}
  for base in ('f32', 'int8', 'int4'):
    q = quantized.quantize_frozen(frozen, base, group=16)
    for x in jax.tree.leaves(q, is_leaf=quantized.is_quantized):  # rank >= 2 leaves quantized
      assert isinstance(x, Quantized) == (base != 'f32' and len(x.shape) >= 2)
    if base == 'int4':
      got = zoo.loss_at(loss, trainable, q, batch, None, 0.0)
      want = loss(zoo.overlay(quantized.dequantize_tree(q), trainable), batch)
      np.testing.assert_allclose(got, want, rtol=1e-6)
    peaks[base] = compiled_memory(step, trainable, q, batch, keys, jnp.float32(LR),
                                  donate_argnums=0)['peak_bytes']
  # int8 with a scale per 16 columns: 1.25 bytes a weight; int4 0.75; float32 4.
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
  assert peaks['int8'] < peaks['f32'] - 0.6 * frozen_bytes
  assert peaks['int4'] < peaks['int8'] - 0.1 * frozen_bytes


def test_bad_perturb_and_base_configs_are_config_errors():
  with pytest.raises(ConfigError, match='perturb_impl'):
    zoo.Estimator(perturb_impl='triton')
  with pytest.raises(ConfigError, match='Gaussian'):
    zoo.Estimator(perturb_impl='pallas', distribution='rademacher')
  trainable, frozen = zoo.Subset('full').split(_params(ENCODER))
  with pytest.raises(ConfigError, match='leaves none frozen'):
    quantized.quantize_frozen(frozen, 'int8')
  _, frozen = zoo.Subset('head').split(_params(ENCODER))
  with pytest.raises(ConfigError, match='does not divide'):
    quantized.quantize_frozen(frozen, 'int4', group=24)
  with pytest.raises(ConfigError, match='base weight format'):
    quantized.quantize_frozen(frozen, 'nf4')

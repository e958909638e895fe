"""Tiny-config model tests: the per-layer hook, logical axes, dtypes, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax.models import (Decoder, DecoderConfig, Encoder, EncoderConfig,
                                  abstract_params, classification_loss, logical_axes)
from cooperllm_jax.models.spec import path_hash, path_str

TINY_ENC = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4,
                         intermediate_size=64, max_positions=40, num_labels=3)
TINY_DEC = DecoderConfig(vocab_size=101, hidden_size=32, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, max_positions=64,
                         label_token_ids=(5, 7, 9), pad_token_id=0)
MODELS = [Encoder(TINY_ENC), Decoder(TINY_DEC),
          Encoder(TINY_ENC.__class__(**{**TINY_ENC.__dict__, 'family': 'roberta', 'pad_token_id': 1,
                                        'pooling': 'pooler'})),
          Decoder(TINY_DEC.__class__(**{**TINY_DEC.__dict__, 'tie_embeddings': False,
                                        'attention_bias': True}))]
IDS = lambda m: type(m).__name__ + '-' + getattr(m.cfg, 'family', 'tied' if getattr(
    m.cfg, 'tie_embeddings', True) else 'untied')


def _batch(vocab, b=3, t=12, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([t, t // 2, 3])[:b]
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(3, vocab, (b, t)).astype(np.int32) * mask
  return {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask),
          'labels': jnp.asarray(rng.integers(0, 3, b), jnp.int32)}


def _noise(params, scale=0.01):
  def one(path, x):
    return scale * jax.random.normal(jax.random.key(path_hash(path)), x.shape, x.dtype)
  return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.parametrize('model', MODELS, ids=IDS)
def test_hooks_perturb_each_layer_inside_scan_like_a_perturbed_copy(model):
  """`group` sees every dense group once (layers: each slice with its index, traced once inside
  lax.scan) and `rows` every embedding lookup; together they equal running the model on an
  explicitly perturbed copy (what the ZO engine relies on)."""
  params = model.init(jax.random.key(0))
  noise = _noise(params)
  batch = _batch(model.cfg.vocab_size)
  seen = []

  class Hooks:
    def group(self, name, p, layer):
      seen.append(name)
      n = noise[name] if layer is None else jax.tree.map(lambda x: x[layer], noise[name])
      n = {k: n[k] for k in p} if isinstance(p, dict) else n  # models may pass a part of a group
      return jax.tree.map(jnp.add, p, n)

    def rows(self, path, table, ids):
      seen.append('/'.join(path))
      n = noise
      for k in path:
        n = n[k]
      return table[ids] + n[ids]

  hooked = model.logits(params, batch, Hooks())
  copied = model.logits(jax.tree.map(jnp.add, params, noise), batch)
  np.testing.assert_allclose(hooked, copied, atol=1e-5)
  dense_groups = {g for g in seen if '/' not in g}
  assert dense_groups == set(params) - ({'embed'} if 'norm' not in params['embed'] else set())
  assert 'embed/token' in seen
  assert seen.count('layers') == 1                   # traced once inside lax.scan, not unrolled
  assert not np.allclose(hooked, model.logits(params, batch), atol=1e-4)


@pytest.mark.parametrize('model', MODELS, ids=IDS)
def test_logical_axes_cover_every_weight(model):
  specs = model.specs()
  params = model.init(jax.random.key(1))
  axes = logical_axes(specs)
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_p) == len(flat_a)
  for (path, x), ax in zip(flat_p, flat_a):
    assert len(ax) == x.ndim and all(isinstance(a, str) for a in ax), path_str(path)
    if path_str(path).startswith('layers/'):
      assert ax[0] == 'layers' and x.shape[0] == model.cfg.num_layers
  shapes = abstract_params(specs, jnp.bfloat16)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda x: x.shape, params)


@pytest.mark.parametrize('model', MODELS, ids=IDS)
def test_padding_does_not_change_logits(model):
  params = model.init(jax.random.key(2))
  batch = _batch(model.cfg.vocab_size)
  logits = model.logits(params, batch)
  padded = {k: jnp.pad(v, ((0, 0), (0, 5))) if v.ndim == 2 else v for k, v in batch.items()}
  np.testing.assert_allclose(model.logits(params, padded), logits, atol=1e-5)
  row = {k: v[1:2, :6] if v.ndim == 2 else v[1:2] for k, v in batch.items()}  # unpadded row 1
  np.testing.assert_allclose(model.logits(params, row)[0], logits[1], atol=1e-5)


@pytest.mark.parametrize('model', MODELS[:2], ids=IDS)
def test_bf16_params_and_compute_track_float32(model):
  cfg32 = model.cfg
  cfg16 = cfg32.__class__(**{**cfg32.__dict__, 'dtype': 'bfloat16', 'param_dtype': 'bfloat16'})
  params = model.init(jax.random.key(3))
  batch = _batch(cfg32.vocab_size)
  ref = model.logits(params, batch)
  m16 = type(model)(cfg16)
  out = jax.jit(m16.logits)(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), batch)
  assert out.dtype == jnp.float32          # logits and losses stay float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()) + 1e-3)


def test_decoder_causality_and_lm_loss():
  model = Decoder(TINY_DEC)
  params = model.init(jax.random.key(4))
  batch = _batch(TINY_DEC.vocab_size, b=1)
  logits = model.lm_logits(params, batch)
  changed = batch['input_ids'].at[0, 8].set(11)
  logits2 = model.lm_logits(params, {**batch, 'input_ids': changed})
  np.testing.assert_allclose(logits[0, :8], logits2[0, :8], atol=1e-6)   # no peeking ahead
  assert not np.allclose(logits[0, 8:], logits2[0, 8:])
  # lm_loss equals the hand-computed mean next-token NLL
  logp = jax.nn.log_softmax(logits[0, :-1])
  nll = -logp[jnp.arange(11), batch['input_ids'][0, 1:]]
  np.testing.assert_allclose(model.lm_loss(params, batch), nll.mean(), rtol=1e-5)


def test_classification_loss_masks_padded_examples():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [9.0, -9.0]])
  labels = jnp.array([0, 0, 1])
  full = classification_loss(logits[:2], labels[:2])
  masked = classification_loss(logits, labels, weight=jnp.array([1, 1, 0]))
  np.testing.assert_allclose(masked, full, rtol=1e-6)
  np.testing.assert_allclose(full, (np.log1p(np.exp(-2)) + np.log1p(np.exp(2))) / 2, rtol=1e-5)


def test_decoder_classifies_with_label_words_only():
  model = Decoder(TINY_DEC)
  params = model.init(jax.random.key(5))
  batch = _batch(TINY_DEC.vocab_size)
  full = model.next_token_logits(params, batch)
  np.testing.assert_allclose(model.logits(params, batch), full[:, list(TINY_DEC.label_token_ids)],
                             atol=1e-5)

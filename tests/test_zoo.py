"""The ZO engine: key schedule, SPSA unbiasedness, hooks vs perturbed copies, bitwise replay.

Statistical checks use fixed seeds and bounds derived from the samples themselves (t = error /
standard error, |t| < 5), and each also checks that a deliberately wrong variant (1/d-scaled,
halved, sign-flipped) would be rejected by the same bound, so the bound has power.

XLA's CPU compile dominates the run time (every leaf's threefry draw is its own kernel: roughly
0.3-1 s per leaf and traced copy on a 2-core CPU; a client step traces three copies), so the models
are tiny, params are filled with numpy (no init compile), compiled functions are reused where a test
needs several calls, and the exhaustive replay combinations are marked `slow`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cooperllm_jax import zoo
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import clients as fzo
from cooperllm_jax.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.models.spec import is_spec, path_str
from cooperllm_jax.zoo.perturb import Perturbation
from helpers import Q_D, flat, quadratic_loss, quadratic_setup, t_test_rejects

DISTS = ('gaussian', 'rademacher')
SCHEMES = ('central', 'one_sided')

TINY_ENC = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_positions=16, num_labels=3, pooling='pooler')
TINY_DEC = DecoderConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, max_positions=16,
                         tie_embeddings=True, label_token_ids=(5, 7, 9), pad_token_id=0)
MODELS = {'encoder': Encoder(TINY_ENC), 'decoder': Decoder(TINY_DEC)}


def np_params(model, seed=0, std=0.02):
  """Random params from the model's specs with numpy: no XLA compile. 'zeros'/'ones' leaves get a
  small offset too, so biases and norm scales are not degenerate."""
  rng = np.random.default_rng(seed)

  def one(s):
    base = {'zeros': 0.0, 'ones': 1.0}.get(s.init, 0.0)
    return jnp.asarray(base + std * rng.standard_normal(s.shape), jnp.float32)

  return jax.tree.map(one, model.specs(), is_leaf=is_spec)


def tokens(model, shape, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, model.cfg.vocab_size, shape).astype(np.int32)
  mask = np.ones(shape, np.int32)
  mask[..., -1, -3:] = 0            # one right-padded row per batch
  return {'input_ids': jnp.asarray(ids * mask), 'attention_mask': jnp.asarray(mask),
          'labels': jnp.asarray(rng.integers(0, model.num_classes, shape[:-1]), jnp.int32)}


def paths(tree):
  return {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaves_by_path(tree):
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_ulp(a, b):
  a = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
  b = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
  return int(np.abs(a - b).max()) if a.size else 0


# ------------------------------------------------------------------------------------------------
# 1. The key schedule
# ------------------------------------------------------------------------------------------------

KEY = zoo.address_key(11, (1, 2, 3, 0))


@pytest.mark.parametrize('distribution', zoo.keys.DISTRIBUTIONS)
def test_slice_direction_is_the_slice_of_the_whole_leaf_bitwise(distribution):
  # A stacked [layers, in, out] leaf: layer i's slice, by a Python int, an int32 scalar and a traced
  # index inside lax.scan (how the models draw it), is that slice of the whole-leaf draw.
  shape, path = (3, 4, 5), ('layers', 'attn', 'q', 'kernel')
  whole = zoo.leaf_direction(KEY, path, shape, distribution)
  assert whole.shape == shape and whole.dtype == jnp.float32
  for i in range(shape[0]):
    np.testing.assert_array_equal(zoo.slice_direction(KEY, path, i, shape[1:], distribution),
                                  whole[i])
    np.testing.assert_array_equal(
        zoo.slice_direction(KEY, path, jnp.int32(i), shape[1:], distribution), whole[i])
  scanned = jax.jit(lambda k: jax.lax.scan(
      lambda c, i: (c, zoo.slice_direction(k, path, i, shape[1:], distribution)), 0,
      jnp.arange(shape[0], dtype=jnp.int32))[1])(KEY)
  np.testing.assert_array_equal(scanned, whole)
  # Layers are distinct draws, not one draw repeated.
  assert not np.allclose(whole[0], whole[1]) and not np.allclose(whole[1], whole[2])

  # An embedding-like table: the rows an id array looks up (repeats, any shape) are its rows.
  table, tpath = (11, 6), 'embed/token'
  wt = zoo.leaf_direction(KEY, tpath, table, distribution)
  ids = jnp.array([[3, 0, 10], [3, 7, 7]], jnp.int32)
  rows = zoo.slice_direction(KEY, tpath, ids, table[1:], distribution)
  assert rows.shape == (2, 3, 6)
  np.testing.assert_array_equal(rows, wt[ids])
  np.testing.assert_array_equal(
      jax.jit(lambda k, i: zoo.slice_direction(k, tpath, i, table[1:], distribution))(KEY, ids),
      wt[ids])


def test_different_addresses_seeds_and_paths_give_different_directions():
  shape = (4, 6)
  base = zoo.leaf_direction(zoo.address_key(3, (1, 2, 3, 4)), 'a/b', shape)
  others = [zoo.leaf_direction(zoo.address_key(3, a), 'a/b', shape)
            for a in [(0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0),   # each field
                      (2, 1, 3, 4),                                          # field order matters
                      (-1, -1, -1, 4)]]                                      # shared-pool addresses
  others += [zoo.leaf_direction(zoo.address_key(4, (1, 2, 3, 4)), 'a/b', shape),  # seed
             zoo.leaf_direction(zoo.address_key(3, (1, 2, 3, 4)), 'a/c', shape),  # path
             zoo.leaf_direction(zoo.address_key(3, (1, 2, 3, 4)), 'b/a', shape)]
  for z in others:
    assert z.shape == shape
    # Independent N(0,1) draws: they differ almost everywhere, not just somewhere.
    assert np.mean(np.asarray(z) != np.asarray(base)) > 0.9
  # ... while the same address is the same draw.
  np.testing.assert_array_equal(
      zoo.leaf_direction(zoo.address_key(3, (1, 2, 3, 4)), 'a/b', shape), base)


def test_key_is_threefry_whatever_the_default_prng_impl():
  addr = (1, 2, 3, 4)
  ref_key = zoo.address_key(5, addr)
  ref = zoo.leaf_direction(ref_key, 'layers/mlp/up/kernel', (2, 3, 4))
  old = jax.config.jax_default_prng_impl
  try:
    jax.config.update('jax_default_prng_impl', 'rbg')
    assert str(jax.random.key_impl(jax.random.key(0))) == 'rbg'      # the switch took effect
    key = zoo.address_key(5, addr)
    assert str(jax.random.key_impl(key)) == 'threefry2x32'
    assert str(jax.random.key_impl(zoo.root_key(5))) == 'threefry2x32'
    z = zoo.leaf_direction(key, 'layers/mlp/up/kernel', (2, 3, 4))
  finally:
    jax.config.update('jax_default_prng_impl', old)
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(ref_key))
  np.testing.assert_array_equal(z, ref)
  np.testing.assert_array_equal(jax.random.key_data(zoo.root_key(5)),
                                jax.random.key_data(jax.random.key(5, impl='threefry2x32')))


def test_path_as_tuple_string_or_tree_path_is_the_same_leaf():
  shape = (3, 2, 5)
  as_tuple = zoo.leaf_direction(KEY, ('layers', 'attn', 'v', 'kernel'), shape)
  as_str = zoo.leaf_direction(KEY, 'layers/attn/v/kernel', shape)
  np.testing.assert_array_equal(as_tuple, as_str)
  tree = {'layers': {'attn': {'v': {'kernel': jnp.zeros(shape)}}}, 'head': {'bias': jnp.zeros(3)}}
  from_tree = zoo.tree_direction(KEY, tree)
  np.testing.assert_array_equal(from_tree['layers']['attn']['v']['kernel'], as_str)
  np.testing.assert_array_equal(from_tree['head']['bias'],
                                zoo.leaf_direction(KEY, 'head/bias', (3,)))
  np.testing.assert_array_equal(
      zoo.slice_direction(KEY, ('layers', 'attn', 'v', 'kernel'), 1, shape[1:]),
      zoo.slice_direction(KEY, 'layers/attn/v/kernel', 1, shape[1:]))


def test_gaussian_moments_and_rademacher_signs():
  n_rows, n_cols = 64, 1024
  n = n_rows * n_cols
  z = np.asarray(zoo.leaf_direction(KEY, 'stats/gauss', (n_rows, n_cols)), np.float64).ravel()
  se_mean = z.std() / math.sqrt(n)
  assert abs(z.mean()) < 5 * se_mean
  sq = z ** 2
  se_var = sq.std() / math.sqrt(n)
  assert abs(sq.mean() - 1.0) < 5 * se_var
  assert abs(1.1 ** 2 * sq.mean() - 1.0) > 5 * se_var          # a 1.1-scaled draw would fail
  # Slices are independent: consecutive rows (and a different probe's draw) are uncorrelated.
  zz = z.reshape(n_rows, n_cols)
  corr = np.corrcoef(zz[:-1].ravel(), zz[1:].ravel())[0, 1]
  assert abs(corr) < 5 / math.sqrt(zz[1:].size)
  other = np.asarray(zoo.leaf_direction(zoo.address_key(11, (1, 2, 3, 1)), 'stats/gauss',
                                        (n_rows, n_cols)), np.float64).ravel()
  assert abs(np.corrcoef(z, other)[0, 1]) < 5 / math.sqrt(n)

  r = np.asarray(zoo.leaf_direction(KEY, 'stats/rad', (n_rows, n_cols), 'rademacher'))
  assert r.dtype == np.float32
  assert set(np.unique(r).tolist()) == {-1.0, 1.0}
  assert abs(r.mean()) < 5 / math.sqrt(n)                     # std of a sign is exactly 1
  with pytest.raises(ValueError, match='distribution'):
    zoo.leaf_direction(KEY, 'x', (3,), 'uniform')


def test_address_keys_equal_per_address_keys():
  rng = np.random.default_rng(0)
  addrs = rng.integers(-1, 5000, (12, 4)).astype(np.int32)
  addrs[0] = (-1, -1, -1, 7)                       # FedKSeed-style shared pool
  addrs[1] = (2**31 - 1, 0, 0, 0)                  # int32 extremes fold in fine
  keys = zoo.address_keys(9, jnp.asarray(addrs))
  assert keys.shape == (12,)
  for i in range(len(addrs)):
    np.testing.assert_array_equal(jax.random.key_data(keys[i]),
                                  jax.random.key_data(zoo.address_key(9, tuple(addrs[i]))))
    np.testing.assert_array_equal(
        jax.random.key_data(keys[i]),
        jax.random.key_data(zoo.address_key(9, tuple(int(a) for a in addrs[i]))))
  # Leading batch dims are kept; a traced seed (as inside the clients' jit) gives the same keys.
  keys3 = jax.jit(zoo.address_keys)(jnp.int32(9), jnp.asarray(addrs).reshape(3, 4, 4))
  assert keys3.shape == (3, 4)
  np.testing.assert_array_equal(jax.random.key_data(keys3).reshape(12, -1),
                                jax.random.key_data(keys))
  assert len({tuple(np.asarray(jax.random.key_data(k))) for k in keys}) == 12


# ------------------------------------------------------------------------------------------------
# 2. SPSA on a quadratic: L(theta) = 0.5 (theta - c)^T A (theta - c)
# ------------------------------------------------------------------------------------------------

Q_SHAPES = {'q': {'w': (4, 5)}, 'e': {'token': (6, 3)}}     # a 2-D dense leaf and a 2-D table
Q_N = 8192


@pytest.fixture(scope='module')
def quadratic():
  return quadratic_setup()


def _probe_samples(est, trainable, batch, n, start=0):
  """(g [n], z [n, d], loss [n]) for n single-probe estimates at addresses (0, 0, 0, start + i)."""
  estimate = zoo.make_estimate(quadratic_loss, est)

  def one(key):
    g, loss = estimate(trainable, {}, batch, key[None])
    return g[0], flat(zoo.tree_direction(key, trainable, est.distribution)), loss

  addrs = jnp.stack([jnp.zeros(n, jnp.int32)] * 3 + [start + jnp.arange(n, dtype=jnp.int32)], -1)
  return jax.jit(jax.vmap(one))(zoo.address_keys(0, addrs))


@pytest.mark.parametrize('distribution', zoo.keys.DISTRIBUTIONS)
@pytest.mark.parametrize('scheme', SCHEMES)
def test_spsa_is_unbiased_on_a_quadratic(quadratic, scheme, distribution):
  trainable, batch, grad, a, c, theta = quadratic
  eps = 0.05
  est = zoo.Estimator(eps=eps, probes=1, scheme=scheme, distribution=distribution)
  g, z, loss = (np.asarray(x, np.float64) for x in _probe_samples(est, trainable, batch, Q_N))

  # Each probe is exactly the formula (float64 reference from the same z): central differences are
  # exact on a quadratic; one-sided ones carry eps/2 z^T A z.
  v = np.asarray(grad)
  curv = np.einsum('ni,ij,nj->n', z, a, z)
  expect = z @ v + (0.0 if scheme == 'central' else eps / 2 * curv)
  np.testing.assert_allclose(g, expect, rtol=0, atol=1e-4 * np.linalg.norm(v) + 1e-4 * curv.max())
  x0 = np.asarray(flat(theta)) - c
  l0 = 0.5 * x0 @ a @ x0
  expect_loss = l0 + (eps ** 2 / 2 * curv if scheme == 'central' else 0.0)
  np.testing.assert_allclose(loss, expect_loss, rtol=1e-5)

  # The estimate g z averages to the gradient: every component within 5 standard errors, and the
  # sum of squared t-statistics within 5 sd of its chi^2_d mean.
  ghat = g[:, None] * z
  mean, se = ghat.mean(0), ghat.std(0, ddof=1) / math.sqrt(Q_N)

  t = (mean - v) / se
  assert not t_test_rejects(mean, se, v), (np.abs(t).max(), (t ** 2).sum())
  # The same bounds reject a 1/d-scaled (no E[zz^T] = I), a halved (e.g. 2 eps for one-sided) and a
  # sign-flipped estimator.
  for wrong in (mean / Q_D, mean / 2, -mean):
    assert t_test_rejects(wrong, se, v)


def test_probes_clip_and_base_loss(quadratic):
  trainable, batch, grad, a, c, theta = quadratic
  n, eps = 64, 0.05
  clip = 0.5 * float(np.linalg.norm(grad))     # central Gaussian g ~ N(0, |v|^2): ~60% clipped
  single = zoo.make_estimate(quadratic_loss, zoo.Estimator(eps=eps))
  clipped = zoo.make_estimate(quadratic_loss, zoo.Estimator(eps=eps, clip=clip))
  step = zoo.make_zo_step(quadratic_loss, zoo.Estimator(eps=eps, probes=3))
  keys = zoo.address_keys(0, jnp.stack([jnp.zeros(n, jnp.int32)] * 3
                                       + [jnp.arange(n, dtype=jnp.int32)], -1))

  @jax.jit
  def run(keys):
    per_key = lambda est: jax.vmap(lambda k: est(trainable, {}, batch, k[None]))(keys)
    (g, loss), (g_clip, _) = per_key(single), per_key(clipped)
    stepped, g3, loss3 = step(trainable, {}, batch, keys[jnp.array([5, 2, 9])], 0.01)
    z3 = jax.vmap(lambda k: flat(zoo.tree_direction(k, trainable)))(keys[jnp.array([5, 2, 9])])
    l0 = zoo.loss_at(quadratic_loss, trainable, {}, batch, None, 0.0)
    return g[:, 0], loss, g_clip[:, 0], g3, loss3, l0, flat(stepped), z3

  g, loss, g_clip, g3, loss3, l0, stepped, z3 = (np.asarray(x) for x in run(keys))
  assert np.abs(g_clip).max() <= clip
  np.testing.assert_array_equal(g_clip, np.clip(g, -clip, clip))
  assert (np.abs(g) > clip).sum() >= n // 4            # clipping was active
  # A step with P probes: g[p] is probe p's single-probe estimate, in key order; the loss is their
  # mean. (Batched and unbatched losses may round differently by an ulp, which g divides by eps.)
  np.testing.assert_allclose(g3, g[[5, 2, 9]], rtol=0, atol=4 * np.spacing(loss.max()) / eps)
  np.testing.assert_allclose(loss3, loss[[5, 2, 9]].mean(), rtol=1e-6)
  # ... and the step is theta - lr (1/P) sum_p g_p z_p.
  want = np.asarray(flat(trainable), np.float64) - 0.01 / 3 * (g3.astype(np.float64) @ z3)
  np.testing.assert_allclose(stepped, want, rtol=0, atol=1e-5)
  assert np.abs(stepped - np.asarray(flat(trainable))).max() > 1e-2
  # key=None in loss_at is the unperturbed loss.
  x0 = np.asarray(flat(theta)) - c
  np.testing.assert_allclose(l0, 0.5 * x0 @ a @ x0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. Trainable subsets; the hook equals an explicitly perturbed copy
# ------------------------------------------------------------------------------------------------

MODES = ('full', 'bitfit', 'head', 'lora')


def _subset(mode):
  return zoo.Subset(mode, lora_rank=4, lora_alpha=8.0, lora_targets=('attn/q', 'attn/v'))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', sorted(MODELS))
def test_split_selects_the_documented_leaves(name, mode):
  model = MODELS[name]
  params = np_params(model)
  sub = _subset(mode)
  trainable, frozen = sub.split(params, jax.random.key(1))
  all_paths, t_paths, f_paths = paths(params), paths(trainable), paths(frozen)
  assert zoo.trainable_paths(trainable) == frozenset(t_paths)
  is_head = lambda p: p.split('/')[0] not in ('embed', 'layers')
  lora = {p for p in t_paths if p.endswith(('/lora_a', '/lora_b'))}
  expected = {'full': all_paths,
              'bitfit': {p for p in all_paths if is_head(p) or p.endswith('/bias')},
              'head': {p for p in all_paths if is_head(p)},
              'lora': {p for p in all_paths if is_head(p)}}[mode]
  assert t_paths - lora == expected
  assert not t_paths & f_paths and (t_paths - lora) | f_paths == all_paths   # disjoint, complete
  if name == 'decoder':
    assert {p for p in all_paths if is_head(p)} == {'final_norm/scale'}     # tied: no lm_head
  else:
    assert {p for p in all_paths if is_head(p)} == {
        'head/classifier/kernel', 'head/classifier/bias', 'head/pooler/kernel', 'head/pooler/bias'}
  if mode == 'bitfit' and name == 'encoder':
    assert 'layers/attn/q/bias' in t_paths and 'embed/norm/bias' in t_paths
    assert 'layers/attn/q/kernel' not in t_paths and 'embed/norm/scale' not in t_paths

  merged = zoo.overlay(frozen, trainable)
  flat_params, flat_merged = leaves_by_path(params), leaves_by_path(merged)
  assert set(flat_merged) - lora == set(flat_params)
  for p, x in flat_params.items():
    assert flat_merged[p] is x                      # the same arrays, nothing copied or changed

  if mode == 'lora':
    n, r = model.cfg.num_layers, sub.lora_rank
    assert lora == {'layers/attn/q/lora_a', 'layers/attn/q/lora_b', 'layers/attn/v/lora_a',
                    'layers/attn/v/lora_b'}
    for target in ('q', 'v'):
      kernel = params['layers']['attn'][target]['kernel']
      a = trainable['layers']['attn'][target]['lora_a']
      b = trainable['layers']['attn'][target]['lora_b']
      assert a.shape == (n, kernel.shape[1], r) and b.shape == (n, r, kernel.shape[2])
      assert a.dtype == b.dtype == jnp.float32
      assert np.all(np.asarray(b) == 0) and np.asarray(a).std() > 0
    assert sub.lora_scale == 2.0
  else:
    assert not lora and sub.lora_scale == 0.0
  # At init (LoRA B = 0) the materialized model is the original, exactly.
  out = sub.materialize(frozen, trainable)
  assert paths(out) == all_paths
  for p, x in leaves_by_path(out).items():
    np.testing.assert_array_equal(x, flat_params[p], err_msg=p)


def test_subset_config_errors():
  enc = np_params(MODELS['encoder'])
  with pytest.raises(ConfigError, match='mode'):
    zoo.Subset('everything')
  with pytest.raises(ConfigError, match='lora_rank'):
    zoo.Subset('lora', lora_rank=0)
  for bad in ('attn/x', 'mlp/gate', 'nope'):          # no such layer weight (encoder has mlp/up)
    with pytest.raises(ConfigError, match=bad):
      zoo.Subset('lora', lora_targets=(bad,)).split(enc, jax.random.key(0))
  with pytest.raises(ConfigError, match='attn_norm'):  # a weight, but not a dense layer
    zoo.Subset('lora', lora_targets=('attn_norm',)).split(enc, jax.random.key(0))
  with pytest.raises(ValueError, match='key'):
    zoo.Subset('lora').split(enc)
  # A model with no biases and no head groups: bitfit/head select nothing.
  bare = {'embed': {'token': jnp.zeros((5, 2))},
          'layers': {'mlp': {'kernel': jnp.zeros((2, 2, 2))}}}
  for mode in ('bitfit', 'head'):
    with pytest.raises(ConfigError, match='selects no parameters'):
      zoo.Subset(mode).split(bare)


def test_lora_targets_take_peft_names_and_an_error_lists_the_valid_ones():
  enc, dec = np_params(MODELS['encoder']), np_params(MODELS['decoder'])
  key = jax.random.key(0)
  ours, _ = zoo.Subset('lora', lora_targets=('attn/q', 'attn/v')).split(enc, key)
  peft, _ = zoo.Subset('lora', lora_targets=('q_proj', 'value', 'attn/q')).split(enc, key)
  assert jax.tree.structure(peft) == jax.tree.structure(ours)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(peft), jax.tree.leaves(ours)))
  assert zoo.Subset('lora', lora_targets=('gate_proj',)).lora_targets == ('mlp/gate',)
  with pytest.raises(ConfigError, match=r"'q_prj' is not a layer weight of this model; choose "
                     r'from attn/k, attn/o, attn/q, attn/v, mlp/down, mlp/up \(or their PEFT '
                     r'names q_proj, k_proj, v_proj, o_proj, query, key, value, up_proj, '
                     r'down_proj\)'):
    zoo.Subset('lora', lora_targets=('q_prj',)).split(enc, key)
  with pytest.raises(ConfigError, match='mlp/down, mlp/gate, mlp/up'):   # a decoder's has gate
    zoo.Subset('lora', lora_targets=('nope',)).split(dec, key)


def test_lora_target_naming_a_leaf_is_a_config_error():
  enc = np_params(MODELS['encoder'])
  with pytest.raises(ConfigError, match='attn/q/kernel'):
    zoo.Subset('lora', lora_targets=('attn/q/kernel',)).split(enc, jax.random.key(0))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', sorted(MODELS))
def test_hook_equals_explicitly_perturbed_copy(name, mode):
  model = MODELS[name]
  loss = make_loss(model)
  sub = _subset(mode)
  trainable, frozen = sub.split(np_params(model), jax.random.key(1))
  if mode == 'lora':   # non-zero B, so the hook's in-scan merge of A @ B is exercised
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if path_str(p).endswith('lora_b') else x, trainable)
  batch = tokens(model, (4, 8))
  key = zoo.address_key(3, (1, 2, 3, 4))
  scale = 0.05

  @jax.jit
  def both(t):
    hooked = zoo.loss_at(loss, t, frozen, batch, key, scale, subset=sub)
    z = zoo.tree_direction(key, t)
    copy = sub.materialize(frozen, jax.tree.map(lambda x, zz: x + scale * zz, t, z))
    plain = loss(sub.materialize(frozen, t), batch)
    # key=None: the unperturbed loss (for LoRA: the adapters merged by the hook)
    base = zoo.loss_at(loss, t, frozen, batch, None, 0.0, subset=sub) if mode == 'lora' else plain
    return hooked, loss(copy, batch), base, plain

  hooked, copied, base, plain = (float(x) for x in both(trainable))
  assert hooked == pytest.approx(copied, rel=1e-6, abs=1e-7)
  assert base == pytest.approx(plain, rel=1e-6, abs=1e-7)
  # The perturbation is visible (a no-op hook would pass the equalities above).
  assert abs(hooked - plain) > 1e-5


def test_hoist_perturbs_the_vectors_whole_and_leaves_the_rest_to_the_hooks():
  trainable = np_params(MODELS['encoder'])
  key = zoo.address_key(3, (1, 2, 3, 4))
  pert = Perturbation(frozenset(paths(trainable)), key, 0.05, 'gaussian_hash')
  hoisted, rest = pert.hoist(trainable)
  before, after = leaves_by_path(trainable), leaves_by_path(hoisted)
  z = leaves_by_path(zoo.tree_direction(key, trainable, 'gaussian_hash'))
  # Vectors: rank 1, or rank 2 in the stacked layers (one vector per layer).
  vectors = {p for p, x in before.items() if x.ndim - p.startswith('layers/') <= 1}
  assert {'layers/attn/q/bias', 'layers/attn_norm/scale', 'embed/norm/bias'} <= vectors
  assert 'layers/attn/q/kernel' not in vectors and 'embed/position' not in vectors
  assert rest.paths == pert.paths - vectors
  for p, x in before.items():
    want = x + np.float32(0.05) * z[p] if p in vectors else x
    np.testing.assert_array_equal(after[p], want, err_msg=p)
  assert Perturbation(pert.paths).hoist(trainable) == (trainable, Perturbation(pert.paths))


# ------------------------------------------------------------------------------------------------
# 4. The edge's replay of a client's uplink reproduces the client bit for bit
# ------------------------------------------------------------------------------------------------

STEPS, PROBES, LR, SEED = 3, 2, 0.02, 7
_replay = jax.jit(zoo.replay, static_argnames='distribution')


# Three cases by default (a full decoder: tied embedding rows looked up twice, stacked layers, with
# threefry and with the counter hash; LoRA on the encoder: adapters merged in the scan, head with
# biases); the other combinations are `slow`: each compiles a client and a replay, ~10-30 s on a
# 2-core CPU.
SLOW = pytest.mark.slow


@pytest.mark.parametrize('name,mode,distribution', [
    ('decoder', 'full', 'rademacher'), ('encoder', 'lora', 'gaussian'),
    ('decoder', 'full', 'gaussian_hash'), ('encoder', 'lora', 'rademacher_hash'),
    pytest.param('encoder', 'full', 'gaussian', marks=SLOW),
    pytest.param('encoder', 'full', 'rademacher', marks=SLOW),
    pytest.param('encoder', 'lora', 'rademacher', marks=SLOW),
    pytest.param('decoder', 'full', 'gaussian', marks=SLOW),
    pytest.param('decoder', 'lora', 'gaussian', marks=SLOW),
    pytest.param('decoder', 'lora', 'rademacher', marks=SLOW)])
def test_replay_of_uplink_equals_local_training_bitwise(name, mode, distribution):
  model = MODELS[name]
  sub = _subset(mode)
  trainable, frozen = sub.split(np_params(model), jax.random.key(1))
  est = zoo.Estimator(eps=1e-2, probes=PROBES, distribution=distribution)
  client = jax.jit(fzo.make_client_update(make_loss(model), est, sub))
  batches = tokens(model, (STEPS, 4, 8), seed=1)
  local, up, losses = client(trainable, frozen, batches, SEED, 2, 5, LR)

  assert up.addresses.shape == (STEPS, PROBES, 4) and up.scalars.shape == (STEPS, PROBES)
  want = np.array([[[2, 5, s, p] for p in range(PROBES)] for s in range(STEPS)], np.int32)
  np.testing.assert_array_equal(up.addresses, want)
  np.testing.assert_array_equal(up.weights, np.full((STEPS, PROBES), 1 / PROBES, np.float32))
  assert np.all(np.isfinite(losses)) and np.all(np.asarray(up.scalars) != 0)

  addrs = jnp.asarray(up.addresses).reshape(-1, 4)
  coefs = zoo.coefficients(LR, up.scalars, up.weights).reshape(-1)
  replayed = _replay(trainable, jnp.int32(SEED), addrs, coefs, distribution=distribution)
  ulps = {p: max_ulp(x, leaves_by_path(local)[p]) for p, x in leaves_by_path(replayed).items()}
  assert max(ulps.values()) == 0, f'replay differs from the client: max ulp per leaf {ulps}'
  moved = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(local),
                                                          jax.tree.leaves(trainable)))
  assert moved > 1e-4                                  # the client did move
  # The ledger is what matters: another seed, or one entry dropped, does not reproduce it.
  for seed, c in ((SEED + 1, coefs), (SEED, coefs.at[3].set(0.0))):
    other = _replay(trainable, jnp.int32(seed), addrs, c, distribution=distribution)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(other),
                                                        jax.tree.leaves(local)))


# ------------------------------------------------------------------------------------------------
# 5. Estimator validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('field,value', [
    ('eps', 0.0), ('eps', -1e-3), ('eps', float('nan')), ('probes', 0), ('probes', -2),
    ('scheme', 'forward'), ('distribution', 'uniform'), ('clip', 0.0), ('clip', -1.0)])
def test_estimator_rejects_bad_fields(field, value):
  with pytest.raises(ConfigError, match=field):
    zoo.Estimator(**{field: value})


def test_estimator_accepts_good_fields_and_counts_forwards():
  assert zoo.Estimator(probes=3).forwards_per_step == 6
  assert zoo.Estimator(probes=3, scheme='one_sided').forwards_per_step == 4
  zoo.Estimator(eps=1e-5, probes=1, scheme='one_sided', distribution='rademacher', clip=10.0)

"""The counter-hash directions ('gaussian_hash', 'rademacher_hash', zoo/keys.py): their law at
N ~ 1e6 samples, independence across counters and addresses, and that any slice or block of a leaf
is the whole leaf's draw bit for bit (what the layer hooks, the update and the replay rely on)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cooperllm_jax import zoo
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.zoo import keys as keys_lib

KEY = zoo.address_key(3, (1, 2, 3, 0))
ROWS, COLS = 1024, 1024   # N = 2^20
N = ROWS * COLS


def _draw(key=KEY, path='stats/w', distribution='gaussian_hash'):
  return np.asarray(zoo.leaf_direction(key, path, (ROWS, COLS), distribution), np.float64)


@pytest.fixture(scope='module')
def z():
  return _draw()


def _assert_standard_normal_moments(x):
  # Standard errors of the sample moments of N(0, 1): sqrt(1/n), sqrt(2/n), sqrt(6/n), sqrt(24/n).
  n = x.size
  assert abs(x.mean()) < 4 * math.sqrt(1 / n)
  assert abs(x.var() - 1) < 4 * math.sqrt(2 / n)
  assert abs(stats.skew(x)) < 4 * math.sqrt(6 / n)
  assert abs(stats.kurtosis(x)) < 4 * math.sqrt(24 / n)


def test_gaussian_moments(z):
  _assert_standard_normal_moments(z.ravel())


def test_gaussian_passes_kolmogorov_smirnov_and_anderson_darling(z):
  x = z.ravel()
  ks = stats.kstest(x, 'norm').statistic
  assert ks < 1.628 / math.sqrt(N)        # the asymptotic 1% critical value
  ad = stats.anderson(x[:100_000], 'norm', method='interpolate').statistic
  assert ad < 1.092                       # its 1% critical value (mean and variance estimated)
  # The tails: the share beyond 3 and 4 sigma within 4 standard errors of the normal's.
  for t in (3.0, 4.0):
    p = 2 * stats.norm.sf(t)
    assert abs(np.mean(np.abs(x) > t) - p) < 4 * math.sqrt(p / N)


def test_neighbouring_counters_rows_addresses_and_leaves_are_uncorrelated(z):
  bound = 5 / math.sqrt(N)
  corr = lambda a, b: abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])
  assert corr(z[:, :-1], z[:, 1:]) < bound                              # counter e, e + 1
  assert corr(z[:-1], z[1:]) < bound                                    # e, e + COLS
  assert corr(z[:, :-1] ** 2, z[:, 1:] ** 2) < bound                    # beyond linear
  for other in (_draw(zoo.address_key(3, (1, 2, 3, 1))),                # the next probe
                _draw(zoo.address_key(4, (1, 2, 3, 0))),                # another seed
                _draw(path='stats/v')):                                 # another leaf
    assert corr(z, other) < bound
    assert corr(z ** 2, other ** 2) < bound


def _assert_standard_normal(x):
  _assert_standard_normal_moments(x)
  assert stats.kstest(x, 'norm').statistic < 1.628 / math.sqrt(x.size)


def _assert_fair_signs(x):
  assert set(np.unique(x).tolist()) == {-1.0, 1.0}
  assert abs(x.mean()) < 4 / math.sqrt(x.size)


# The marginal law's check and the powers of z whose correlation must vanish (z and z^2 for the
# Gaussian; for fair +-1 signs, uncorrelated is independent).
LAWS = [('gaussian_hash', _assert_standard_normal, (1, 2)),
        ('rademacher_hash', _assert_fair_signs, (1,))]


@pytest.mark.parametrize('distribution,law,powers', LAWS)
def test_one_weight_over_many_addresses_is_iid(distribution, law, powers):
  """What an SGD run averages over: a weight's z across rounds, clients, steps and probes. Per
  address field, 2^14 consecutive values (the other fields fixed) x 16 weights: the pooled 2^20
  draws follow the law (N(0, 1): moments and Kolmogorov-Smirnov; Rademacher: fair signs), and a
  weight's z at neighbouring addresses is uncorrelated."""
  n, width = 1 << 14, 16
  draw = jax.jit(jax.vmap(lambda k: zoo.leaf_direction(k, 'stats/w', (width,), distribution)))
  pooled = []
  for field, name in enumerate(keys_lib.ADDRESS_FIELDS):
    addresses = np.ones((n, len(keys_lib.ADDRESS_FIELDS)), np.int32)
    addresses[:, field] = np.arange(n)
    z = np.asarray(draw(zoo.address_keys(3, jnp.asarray(addresses))), np.float64)  # [n, width]
    bound = 5 / math.sqrt(z[1:].size)
    for p in powers:                                                           # address i, i + 1
      assert abs(np.corrcoef(z[:-1].ravel() ** p, z[1:].ravel() ** p)[0, 1]) < bound, name
    pooled.append(z.ravel())
  law(np.concatenate(pooled))


def test_counter_bits_are_uniform():
  bits = np.asarray(keys_lib.counter_bits(KEY, 'stats/bits', jnp.arange(N, dtype=jnp.uint32)))
  ones = np.unpackbits(bits.view(np.uint8)).reshape(N, 32).mean(0)
  assert np.all(np.abs(ones - 0.5) < 4 * 0.5 / math.sqrt(N))            # every bit fair
  counts = np.bincount(bits >> 24, minlength=256)                       # top byte: chi^2, 255 dof
  assert stats.chisquare(counts).pvalue > 0.001


def test_rademacher_signs():
  r = _draw(path='stats/r', distribution='rademacher_hash')
  assert zoo.leaf_direction(KEY, 'stats/r', (2, 2), 'rademacher_hash').dtype == jnp.float32
  _assert_fair_signs(r.ravel())
  corr = lambda a, b: abs(np.corrcoef(a.ravel(), b.ravel())[0, 1])
  assert corr(r[:, :-1], r[:, 1:]) < 5 / math.sqrt(N)                   # counter e, e + 1
  assert corr(r[:-1], r[1:]) < 5 / math.sqrt(N)                         # e, e + COLS
  for other in (_draw(zoo.address_key(3, (1, 2, 3, 1)), 'stats/r', 'rademacher_hash'),
                _draw(zoo.address_key(4, (1, 2, 3, 0)), 'stats/r', 'rademacher_hash'),
                _draw(KEY, 'stats/s', 'rademacher_hash')):
    assert corr(r, other) < 5 / math.sqrt(N)


@pytest.mark.parametrize('distribution', ['gaussian_hash', 'rademacher_hash'])
def test_slices_and_blocks_are_the_whole_draw_bitwise(distribution):
  shape, path = (5, 6, 7), 'layers/mlp/kernel'
  whole = np.asarray(zoo.leaf_direction(KEY, path, shape, distribution))
  ids = jnp.array([[4, 0], [2, 2]], jnp.int32)
  np.testing.assert_array_equal(zoo.slice_direction(KEY, path, ids, shape[1:], distribution),
                                whole[np.asarray(ids)])
  layer = jax.jit(lambda i: zoo.slice_direction(KEY, path, i, shape[1:], distribution))
  for i in range(shape[0]):                              # one layer inside a scan: a traced index
    np.testing.assert_array_equal(layer(jnp.int32(i)), whole[i])
  # The update (which draws hash leaves whole) subtracts exactly that z.
  x = jnp.zeros(shape, jnp.float32)
  np.testing.assert_array_equal(zoo.apply_direction({'layers': {'mlp': {'kernel': x}}}, KEY, 1.0,
                                                    distribution)['layers']['mlp']['kernel'],
                                -whole)


def test_hash_changes_the_bits_and_pallas_refuses_it():
  a = zoo.leaf_direction(KEY, 'w', (4, 8), 'gaussian')
  b = zoo.leaf_direction(KEY, 'w', (4, 8), 'gaussian_hash')
  assert not np.array_equal(a, b)
  with pytest.raises(ConfigError, match='pallas'):
    zoo.Estimator(distribution='gaussian_hash', perturb_impl='pallas')

"""Federated partitions: disjoint stratified splits, determinism, Dirichlet skew, save/load."""

import numpy as np
import pytest

from cooperllm_jax.data import Partition, make_partition
from cooperllm_jax.errors import ConfigError, DataError

# BBC News class sizes (business, entertainment, politics, sports, tech) in a shuffled order.
BBC_COUNTS = (510, 386, 417, 511, 401)
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(5), BBC_COUNTS))


def _all_sets(p):
  return [*p.clients, p.public, p.test, p.validation]


@pytest.mark.parametrize('scheme', ['iid', 'dirichlet'])
@pytest.mark.parametrize('validation', [0.0, 0.1])
def test_disjoint_cover_sorted(scheme, validation):
  p = make_partition(LABELS, num_clients=7, scheme=scheme, alpha=0.5, seed=1,
                     validation_fraction=validation)
  assert p.num_clients == 7
  everything = np.concatenate(_all_sets(p))
  assert len(everything) == len(LABELS)
  np.testing.assert_array_equal(np.sort(everything), np.arange(len(LABELS)))
  for s in _all_sets(p):
    assert s.dtype == np.int64
    assert np.all(np.diff(s) > 0)


def test_stratified_test_public_and_validation():
  p = make_partition(LABELS, num_clients=4, test_fraction=0.2, public_fraction=0.05,
                     validation_fraction=0.1, seed=0)
  for name, split, frac in (('test', p.test, 0.2), ('public', p.public, 0.05),
                            ('validation', p.validation, 0.1)):
    counts = np.bincount(LABELS[split], minlength=5)
    expected = [round(frac * n) for n in BBC_COUNTS]
    np.testing.assert_array_equal(counts, expected, err_msg=name)


def test_validation_comes_out_of_the_clients_only():
  """Holding out a validation set leaves the test and public draws as they were (old runs keep
  their splits) and takes its examples from what the clients held."""
  kw = dict(num_clients=6, scheme='dirichlet', alpha=0.5, min_client_size=0, seed=3)
  plain, held = make_partition(LABELS, **kw), make_partition(LABELS, validation_fraction=0.1, **kw)
  np.testing.assert_array_equal(plain.test, held.test)
  np.testing.assert_array_equal(plain.public, held.public)
  assert len(plain.validation) == 0 and len(held.validation) > 0
  assert set(held.validation) <= set(np.concatenate(plain.clients))


def test_zero_fractions():
  p = make_partition(LABELS, num_clients=3, test_fraction=0.0, public_fraction=0.0)
  assert len(p.test) == 0 and len(p.public) == 0
  assert sum(len(c) for c in p.clients) == len(LABELS)


@pytest.mark.parametrize('scheme', ['iid', 'dirichlet'])
def test_determinism(scheme):
  kw = dict(num_clients=5, scheme=scheme, alpha=0.3)
  a, b = make_partition(LABELS, seed=7, **kw), make_partition(LABELS, seed=7, **kw)
  for x, y in zip(_all_sets(a), _all_sets(b)):
    np.testing.assert_array_equal(x, y)
  assert a.meta == b.meta
  c = make_partition(LABELS, seed=8, **kw)
  assert any(not np.array_equal(x, y) for x, y in zip(_all_sets(a), _all_sets(c)))


def test_iid_sizes_balanced():
  p = make_partition(LABELS, num_clients=13, scheme='iid')
  sizes = [len(c) for c in p.clients]
  assert max(sizes) - min(sizes) <= 1


def test_dirichlet_min_client_size():
  p = make_partition(LABELS, num_clients=20, scheme='dirichlet', alpha=0.1, min_client_size=10,
                     seed=3)
  assert min(len(c) for c in p.clients) >= 10
  assert p.meta['tries'] >= 1


def _mean_tv_to_global(p, labels):
  hist = p.client_label_histogram(labels, 5).astype(float)
  client_dist = hist / hist.sum(axis=1, keepdims=True)
  global_dist = np.bincount(labels, minlength=5) / len(labels)
  return np.mean(0.5 * np.abs(client_dist - global_dist).sum(axis=1))


def test_dirichlet_skew_grows_as_alpha_shrinks():
  tv = [np.mean([_mean_tv_to_global(make_partition(LABELS, num_clients=10, scheme='dirichlet',
                                                   alpha=alpha, seed=s), LABELS)
                 for s in range(3)])
        for alpha in (100.0, 1.0, 0.1)]
  assert tv[0] < tv[1] < tv[2], tv
  assert tv[0] < 0.1 and tv[2] > 0.4, tv


def test_client_label_histogram():
  p = make_partition(LABELS, num_clients=4, seed=2)
  hist = p.client_label_histogram(LABELS, 5)
  assert hist.shape == (4, 5)
  np.testing.assert_array_equal(hist.sum(axis=1), [len(c) for c in p.clients])
  np.testing.assert_array_equal(hist[1], np.bincount(LABELS[p.clients[1]], minlength=5))


def test_save_load_round_trip(tmp_path):
  p = make_partition(LABELS, num_clients=12, scheme='dirichlet', alpha=0.5, seed=4,
                     validation_fraction=0.1)
  path = tmp_path / 'sub' / 'partition.npz'
  p.save(path)
  assert [f.name for f in path.parent.iterdir()] == ['partition.npz']  # no temp file left.
  q = Partition.load(path)
  assert q.num_clients == p.num_clients and q.meta == p.meta
  for x, y in zip(_all_sets(p), _all_sets(q)):
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x, y)


def test_load_errors(tmp_path):
  with pytest.raises(DataError, match='missing.npz'):
    Partition.load(tmp_path / 'missing.npz')
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(DataError, match='bad.npz'):
    Partition.load(bad)


@pytest.mark.parametrize('kw, needle', [
    (dict(num_clients=0), 'num_clients'),
    (dict(num_clients=2, scheme='pathological'), 'pathological'),
    (dict(num_clients=2, scheme='dirichlet', alpha=0.0), 'alpha'),
    (dict(num_clients=2, scheme='dirichlet', alpha=-1.0), 'alpha'),
    (dict(num_clients=2, test_fraction=1.0), 'test_fraction'),
    (dict(num_clients=2, test_fraction=-0.1), 'test_fraction'),
    (dict(num_clients=2, public_fraction=1.5), 'public_fraction'),
    (dict(num_clients=2, test_fraction=0.6, public_fraction=0.4), 'test_fraction + public'),
    (dict(num_clients=2, validation_fraction=-0.1), 'validation_fraction'),
    (dict(num_clients=2, test_fraction=0.5, validation_fraction=0.5), 'validation_fraction must'),
    (dict(num_clients=2, min_client_size=-1), 'min_client_size'),
    (dict(num_clients=2, max_tries=0), 'max_tries'),
    (dict(num_clients=1000, min_client_size=2), 'min_client_size=2'),
    (dict(num_clients=50, scheme='dirichlet', alpha=0.01, min_client_size=30, max_tries=3),
     'alpha=0.01'),
])
def test_config_errors(kw, needle):
  with pytest.raises(ConfigError) as e:
    make_partition(LABELS, **kw)
  assert needle in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('labels', [np.zeros((2, 3), np.int64), np.array([0.5, 1.0]),
                                    np.array([], np.int64)])
def test_bad_labels(labels):
  with pytest.raises(ConfigError, match='labels'):
    make_partition(labels, num_clients=1)

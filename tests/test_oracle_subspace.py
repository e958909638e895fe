"""The oracle study's linear algebra against ground truth: principal directions against numpy's
SVD, the subspace distance at its known extremes, and the bias refit of the recalibration
control against the closed form for constant logits."""

import numpy as np
import pytest

from experiments.bench.oracle_subspace import distance, fit_bias, orthonormal, principal


def test_principal_directions_match_the_svd():
  rng = np.random.default_rng(0)
  rows = (rng.standard_normal((12, 3)) @ rng.standard_normal((3, 50))
          + 0.01 * rng.standard_normal((12, 50))).astype(np.float32)
  _, s, vt = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
  got = principal(rows, 3)
  for j in range(3):   # the same directions up to sign
    assert abs(float(got[:, j] @ vt[j])) == pytest.approx(1.0, abs=1e-4)
  skipped = principal(rows, 2, skip=1)
  assert abs(float(skipped[:, 0] @ vt[1])) == pytest.approx(1.0, abs=1e-4)
  assert s[0] > s[1] > s[2] > 10 * s[3]


def test_orthonormal_spans_and_drops_dependent_columns():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((40, 3))
  cols = np.concatenate([a, a[:, :1] * 2.0], axis=1)   # the fourth column repeats the first
  q = orthonormal(cols)
  assert q.shape == (40, 3)
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(q @ (q.T @ a), a, atol=1e-4)   # a lies in the span


def test_distance_is_zero_for_the_same_span_and_one_for_orthogonal_spans():
  eye = np.eye(10, dtype=np.float32)
  rotated = orthonormal(eye[:, :3] @ np.array([[1.0, 2, 0], [0, 1, 3], [1, 0, 1]]))
  assert distance(rotated, eye[:, :3]) == pytest.approx(0.0, abs=1e-3)
  assert distance(eye[:, 3:6], eye[:, :3]) == pytest.approx(1.0, abs=1e-6)
  half = eye[:, [0, 1, 5, 6]]   # two of four directions shared: sqrt(1 - 2/4)
  assert distance(half, eye[:, :4]) == pytest.approx(np.sqrt(0.5), abs=1e-6)


def test_bias_refit_recovers_the_class_frequencies_for_constant_logits():
  # With logits c 1, the cross-entropy's minimizer is softmax(b) = the label frequencies.
  labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
  b = fit_bias(np.full((100, 3), 0.7), labels)
  p = np.exp(b - b.max())
  np.testing.assert_allclose(p / p.sum(), [0.6, 0.3, 0.1], atol=1e-6)


def test_report_picks_by_validation_and_measures_the_gap_on_test(tmp_path):
  import json
  from experiments.bench.oracle_subspace import report
  root = tmp_path / 'rt' / 'seed=0'
  root.mkdir(parents=True)
  (root / 'start.json').write_text(json.dumps(dict(
      setting='rt', seed=0, d=100, rounds=40, val_accuracy=0.70, test_accuracy=0.70,
      fedavg_bp_test_accuracy=0.80)))
  def run(lr, val, test, diverged=False):
    (root / f'pca_m8_adam_lr{lr:g}.json').write_text(json.dumps(dict(
        candidate='pca', m=8, rule='adam', lr=lr, diverged=diverged, val_accuracy=val,
        test_accuracy=test, val_loss=0.5, distance=0.9, captured=0.1)))
  run(1e-3, 0.71, 0.79)   # the best test accuracy, but not the validation pick
  run(3e-3, 0.74, 0.75)
  run(1e-2, 0.0, 0.0, diverged=True)
  (root / 'full_m0_adam_lr0.001.json').write_text(json.dumps(dict(
      candidate='full', m=100, rule='adam', lr=1e-3, diverged=False, val_accuracy=0.8,
      test_accuracy=0.9, val_loss=0.4, distance=0.0, captured=1.0)))
  report(tmp_path)
  full, row = sorted(json.loads((tmp_path / 'oracle.json').read_text()),
                     key=lambda r: r['candidate'])
  assert row['lr'] == 3e-3 and row['test_accuracy'] == 0.75
  assert row['gap_closed'] == pytest.approx(0.5)
  assert row['share_of_full'] == pytest.approx(0.25)   # (0.75 - 0.70) / (0.90 - 0.70)
  assert full['share_of_full'] == pytest.approx(1.0)
  assert not row['grid_edge']
  assert '| pca | 8 | adam | exact | 0.003 |' in (tmp_path / 'oracle.md').read_text()


@pytest.mark.parametrize('flag, message', [
    ('--settings=nope', "unknown setting 'nope'"),
    ('--candidates=pca,bogus', "unknown candidate 'bogus'"),
    ('--ms=8,x', "--ms takes positive integers, got 'x'"),
    ('--estimates=exact,spsa', "unknown estimate 'spsa'"),
    ('--probes=0', '--probes takes a positive integer, got 0')])
def test_bad_flags_are_one_line_errors_that_write_nothing(tmp_path, flag, message):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, '-m', 'experiments.bench.oracle_subspace', flag,
                         f'--out={tmp_path / "out"}', f'--cache={tmp_path / "cache"}'],
                        capture_output=True, text=True, timeout=300,
                        cwd=__import__('pathlib').Path(__file__).resolve().parent.parent)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(f'error: {message}')
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'cache').exists()


def test_diagnostic_bases_span_the_private_data_they_are_built_from():
  """private_pca spans the private gradients' top principal directions (numpy's SVD); full_path
  spans full's steps when they lie in m dimensions (distance 0 to their row space)."""
  from experiments.bench.oracle_subspace import build
  rng = np.random.default_rng(1)
  basis = np.linalg.qr(rng.standard_normal((40, 3)))[0]
  steps = (rng.standard_normal((10, 3)) @ basis.T).astype(np.float32)   # rank 3, in `basis`
  private_g = rng.standard_normal((20, 40)).astype(np.float32)
  v = build('full_path', 3, None, {}, None, 0, private_g, lambda: steps)
  assert v.shape == (40, 3)
  assert distance(v, basis) == pytest.approx(0.0, abs=1e-3)
  _, _, vt = np.linalg.svd(private_g.astype(np.float64), full_matrices=False)
  v = build('private_pca', 4, None, {}, None, 0, private_g)
  assert distance(v, vt[:4].T) == pytest.approx(0.0, abs=1e-3)
  assert distance(v, vt[4:8].T) == pytest.approx(1.0, abs=1e-3)


def test_gaussian_probe_estimate_is_unbiased():
  """Averaged over rounds (fresh u each), one probe per client recovers sum_i w_i h_i: the
  Monte-Carlo mean within 4 standard errors of the truth, coordinate by coordinate."""
  from experiments.bench.oracle_subspace import probe_estimate
  rng = np.random.default_rng(3)
  hs = rng.standard_normal((20, 8))
  w = rng.random(20)
  w /= w.sum()
  truth = w @ hs
  draws = np.stack([probe_estimate('gaussian', hs, w, np.arange(20), r, 0) for r in range(4000)])
  se = draws.std(axis=0) / np.sqrt(len(draws))
  assert np.all(np.abs(draws.mean(axis=0) - truth) < 4 * se)
  assert np.linalg.norm(draws.mean(axis=0) - truth) < 0.2 * np.linalg.norm(truth) + 4 * se.max()


def test_coordinate_design_is_exact_when_the_clients_agree():
  """Clients with the same gradient: every coordinate the round's design covers is exact, the
  others are 0; across rounds the design covers every coordinate."""
  from experiments.bench.oracle_subspace import probe_estimate
  h = np.arange(1.0, 33.0)
  hs = np.tile(h, (20, 1))
  w = np.full(20, 1 / 20)
  seen = np.zeros(32, bool)
  for r in range(1, 4):
    est = probe_estimate('coordinates', hs, w, np.arange(20), r, 0)
    covered = est != 0
    assert covered.sum() == 20
    np.testing.assert_allclose(est[covered], h[covered])
    seen |= covered
  assert seen.all()


def test_probes_of_a_client_are_clients_of_a_share_of_its_weight():
  """P probes per client estimate as P times the clients at weight w / P: with the coordinate
  design and agreeing clients, 4 probes of 8 clients cover all 32 coordinates in one round."""
  from experiments.bench.oracle_subspace import probe_estimate
  h = np.arange(1.0, 33.0)
  est = probe_estimate('coordinates', np.tile(h, (8, 1)), np.full(8, 1 / 8), np.arange(8), 1, 0,
                       probes=4)
  np.testing.assert_allclose(est, h)
  def mse(probes):   # over 300 rounds (fresh directions each)
    return np.mean([np.sum((probe_estimate('gaussian', np.tile(h, (8, 1)), np.full(8, 1 / 8),
                                           np.arange(8), r, 0, probes=probes) - h) ** 2)
                    for r in range(300)])
  assert 3.0 < mse(1) / mse(4) < 5.3   # 4 times the probes: a quarter of the variance

"""experiments.reproduce's table from hand-made runs: target, best ZO baseline, rounds and simulated
time to target, speed-ups, and the command line's bad flags (no training anywhere)."""

import json
import os
import subprocess
import sys

import pytest

from cooperllm_jax.errors import ConfigError
from experiments.configs import demo
from experiments.variants import best_zo_baseline, write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(algorithm, accuracies, round_s, up=100.0, down=10.0, memory_mib=2.0):
  """(config, summary, metrics) of a finished run: accuracies {round: test accuracy} (round 0
  included; the last is the final round), every round round_s simulated seconds."""
  rounds = max(accuracies)
  config = demo.get_config(algorithm)
  config.rounds = rounds
  metrics = []
  for r in range(rounds + 1):
    row = {'round': r, 'sim_time_s': r * round_s}
    if r:
      row.update(sim_round_s=round_s, bytes_up_per_client=up, bytes_down_per_client=down + r,
                 forwards=10, backwards=0)
    if r in accuracies:
      row['test_accuracy'] = accuracies[r]
    metrics.append(row)
  summary = {'accuracy_before': accuracies[0], 'accuracy_after': accuracies[rounds],
             'client_memory_bytes': memory_mib * 2**20, 'train_seconds': 3.0,
             'sim_time_s': rounds * round_s}
  return config, summary, metrics


def _results():
  # fwdllm is the best ZO baseline (0.6): cooperllm and fedavg_bp end higher but are not ZO
  # baselines. Target 0.6: fwdllm at round 4 (80 s), cooperllm at 2 (10 s), fedavg_bp at 1 (50 s).
  return {
      'cooperllm': _run('cooperllm', {0: 0.2, 1: 0.45, 2: 0.62, 3: 0.7}, 5.0),
      'fedmezo': _run('fedmezo', {0: 0.2, 2: 0.3, 4: 0.5}, 10.0),
      'fwdllm': _run('fwdllm', {0: 0.2, 2: 0.4, 4: 0.6}, 20.0),
      'fedkseed': _run('fedkseed', {0: 0.2, 2: 0.35, 4: 0.55}, 10.0),
      'fedavg_bp': _run('fedavg_bp', {0: 0.2, 1: 0.7, 2: 0.9}, 50.0, up=9e7, memory_mib=500.0),
  }


def _rows(tmp_path):
  table = json.loads((tmp_path / 'table.json').read_text())
  return table, {row['run']: row for row in table['runs']}


def test_best_zo_baseline_ignores_cooperllm_and_fedavg_bp():
  assert best_zo_baseline(_results()) == 'fwdllm'
  only = {k: v for k, v in _results().items() if k in ('cooperllm', 'fedavg_bp')}
  assert best_zo_baseline(only) is None


def test_target_rounds_time_and_speedups(tmp_path):
  md = write_report(tmp_path, _results(), 'test')
  table, rows = _rows(tmp_path)
  assert table['target'] == 0.6 and table['baseline'] == 'fwdllm'
  assert rows['fwdllm']['rounds_to_target'] == 4 and rows['fwdllm']['sim_s_to_target'] == 80.0
  assert rows['fwdllm']['speedup_rounds'] == 1.0 and rows['fwdllm']['speedup_sim_time'] == 1.0
  coop = rows['cooperllm']
  assert (coop['rounds_to_target'], coop['sim_s_to_target']) == (2, 10.0)
  assert (coop['speedup_rounds'], coop['speedup_sim_time']) == (2.0, 8.0)
  bp = rows['fedavg_bp']
  assert (bp['rounds_to_target'], bp['sim_s_to_target']) == (1, 50.0)
  assert (bp['speedup_rounds'], bp['speedup_sim_time']) == (4.0, 1.6)
  assert bp['memory_mib'] == 500.0 and bp['bytes_up_per_client'] == 9e7
  assert bp['bytes_down_per_client'] == 10 + 1.5  # mean over rounds 1 and 2, round 0 left out
  assert bp['sim_time_s'] == 100.0 and bp['train_seconds'] == 3.0
  assert rows['cooperllm']['baseline_same_round'] is None  # fwdllm was not evaluated at round 3
  assert rows['fedmezo']['baseline_same_round'] == 0.6
  assert 'Target accuracy 0.600 (fwdllm\'s final accuracy)' in md
  assert '| cooperllm | 3 | 0.200 | 0.700 | — | 2 | 10.0 | 2.00x | 8.00x | 2.0 |' in md
  for name in ('table.md', 'accuracy.png', 'accuracy_vs_time.png'):
    assert (tmp_path / name).stat().st_size > 0


def test_never_reached_has_no_speedup(tmp_path):
  md = write_report(tmp_path, _results(), 'test')
  _, rows = _rows(tmp_path)
  for run in ('fedmezo', 'fedkseed'):
    assert [rows[run][k] for k in ('rounds_to_target', 'sim_s_to_target', 'speedup_rounds',
                                   'speedup_sim_time')] == [None] * 4
  assert '| fedkseed | 4 | 0.200 | 0.550 | 0.600 | — | — | — | — |' in md


def test_given_target_and_baseline(tmp_path):
  write_report(tmp_path, _results(), 'test', target=0.45)
  table, rows = _rows(tmp_path)
  assert table['target'] == 0.45 and table['baseline'] == 'fwdllm'  # still the best ZO baseline
  assert rows['fedmezo']['rounds_to_target'] == 4 and rows['cooperllm']['rounds_to_target'] == 1
  assert (rows['cooperllm']['speedup_rounds'], rows['cooperllm']['speedup_sim_time']) == (4.0, 16.0)
  # ablate_zgr's form: a named baseline sets the target to its final accuracy.
  write_report(tmp_path, _results(), 'test', baseline='fedmezo')
  table, rows = _rows(tmp_path)
  assert table['target'] == 0.5 and rows['fwdllm']['speedup_sim_time'] == 40.0 / 80.0


def test_no_zo_baseline_needs_a_target(tmp_path):
  only = {k: v for k, v in _results().items() if k in ('cooperllm', 'fedavg_bp')}
  with pytest.raises(ConfigError, match='pass a target'):
    write_report(tmp_path, only, 'test')
  write_report(tmp_path, only, 'test', target=0.65)
  _, rows = _rows(tmp_path)
  assert rows['cooperllm']['rounds_to_target'] == 3 and rows['cooperllm']['speedup_rounds'] is None


def test_runs_without_simulated_time_are_refused(tmp_path):
  results = _results()
  del results['fedmezo'][2][3]['sim_time_s']
  with pytest.raises(ConfigError, match="'fedmezo'.*sim_time_s"):
    write_report(tmp_path, results, 'test')
  assert not (tmp_path / 'table.md').exists()


@pytest.mark.parametrize('flag, message', [
    ('--algorithms=cooperllm,fedsgd', "unknown algorithms ['fedsgd']"),
    ('--target=1.5', 'not an accuracy in (0, 1]'),
    ('--algorithms=cooperllm,fedavg_bp', 'no ZO baseline'),
])
def test_bad_flags_fail_before_training(tmp_path, flag, message):
  proc = subprocess.run([sys.executable, '-m', 'experiments.reproduce', f'--workdir={tmp_path}',
                         flag], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert not list(tmp_path.iterdir())  # nothing ran

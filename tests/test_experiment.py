"""The absl entry point end to end on the real MiniLM and a small local CSV, and its bad inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _csv(tmp_path, n=40):
  words = {'sport': 'football match goal team score', 'money': 'bank market shares profit rate'}
  rng = np.random.default_rng(0)
  rows = ['text,label']
  for i in range(n):
    label = 'sport' if i % 2 else 'money'
    rows.append(' '.join(rng.permutation(words[label].split())) + f' item {i},{label}')
  path = tmp_path / 'tiny.csv'
  path.write_text('\n'.join(rows) + '\n')
  return path


def _train(workdir, *flags):
  cmd = [sys.executable, '-m', 'experiments.train', f'--workdir={workdir}', *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _error_line(proc):
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  return lines[0]


@pytest.mark.slow
def test_tiny_run_writes_metrics_and_summary(tmp_path):
  data = _csv(tmp_path)
  proc = _train(tmp_path / 'wd', f'--config.dataset={data}', '--config.num_clients=2',
                '--config.clients_per_round=2', '--config.rounds=2', '--config.local_steps=1',
                '--config.batch_size=4', '--config.max_length=16', '--config.min_client_size=2',
                '--config.partition=iid', '--config.test_fraction=0.25')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'summary: fedavg_bp on tiny with minilm' in proc.stdout
  rows = [json.loads(l) for l in (tmp_path / 'wd' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [1, 2]
  assert all(0 <= r['test_accuracy'] <= 1 and np.isfinite(r['train_loss']) for r in rows)
  summary = json.loads((tmp_path / 'wd' / 'summary.json').read_text())
  assert summary['test_examples'] == 10
  assert (tmp_path / 'wd' / 'partition.npz').exists()


@pytest.mark.parametrize('flag, message', [
    ('--config.clients_per_round=20', 'clients_per_round=20 exceeds num_clients=10'),
    ('--config.learning_rate=-1', 'learning_rate must be > 0'),
    ('--config.algorithm=nope', "unknown algorithm 'nope'"),
    ('--config.rounds=0', 'rounds must be >= 1'),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, flag, message):
  assert message in _error_line(_train(tmp_path / 'wd', flag))


def test_bad_dataset_path_is_one_line(tmp_path):
  line = _error_line(_train(tmp_path / 'wd', f'--config.dataset={tmp_path}/missing.csv'))
  assert 'missing.csv' in line


def test_existing_workdir_is_not_overwritten(tmp_path):
  wd = tmp_path / 'wd'
  wd.mkdir()
  (wd / 'precious.txt').write_text('keep me')
  assert '--overwrite' in _error_line(_train(wd))
  assert (wd / 'precious.txt').read_text() == 'keep me'


def test_overwrite_refuses_a_directory_that_is_not_a_workdir(tmp_path):
  (tmp_path / 'precious.txt').write_text('keep me')
  assert 'refusing to delete' in _error_line(_train(tmp_path, '--overwrite'))
  assert (tmp_path / 'precious.txt').read_text() == 'keep me'

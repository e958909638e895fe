"""experiments.compare (the cooperllm-compare script) on runs written by hand in the layout
cooperllm-train writes: the table's numbers, the plot, and its refusals (one line, exit 2)."""

import json
import os
import subprocess
import sys
import tomllib

import pytest

from test_experiment import REPO

# Two runs of 2 rounds: one finished (with summary.json) whose guard rolled round 2 back, and one
# still going (no summary.json).
RUNS = {
    'fedmezo': ([{'round': 0, 'test_accuracy': 0.2, 'sim_time_s': 0.0},
                 {'round': 1, 'learning_rate': 0.1, 'bytes_up_per_client': 8,
                  'bytes_down_per_client': 0, 'sim_time_s': 1.5, 'train_loss': 1.0},
                 {'round': 2, 'learning_rate': 0.1, 'bytes_up_per_client': 8,
                  'bytes_down_per_client': 24, 'sim_time_s': 3.0, 'rollback': True,
                  'train_loss': 9.0, 'test_accuracy': 0.3, 'val_accuracy': 0.25}],
                {'train_seconds': 12.0}),
    'cooperllm': ([{'round': 0, 'test_accuracy': 0.2, 'sim_time_s': 0.0},
                   {'round': 1, 'learning_rate': 0.01, 'bytes_up_per_client': 8,
                    'bytes_down_per_client': 3084, 'sim_time_s': 2.0, 'test_accuracy': 0.6},
                   {'round': 2, 'learning_rate': 0.01, 'bytes_up_per_client': 8,
                    'bytes_down_per_client': 3108, 'sim_time_s': 4.0, 'test_accuracy': 0.5}],
                  None),
}


def _compare(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.compare', *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _error_line(proc) -> str:
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  return lines[0]


@pytest.fixture
def runs(tmp_path):
  root = tmp_path / 'runs'
  for name, (rows, summary) in RUNS.items():
    (root / name).mkdir(parents=True)
    (root / name / 'config.json').write_text(json.dumps({'algorithm': name}))
    (root / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    if summary is not None:
      (root / name / 'summary.json').write_text(json.dumps(summary))
  (root / 'sweep.log').write_text('a file beside the runs, passed over by the glob')
  return root


def test_table_and_plot_of_a_glob_of_runs(tmp_path, runs):
  proc = _compare(f'--runs={runs}/*', f'--out={tmp_path / "out"}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / 'out' / 'table.md').read_text() == proc.stdout
  assert (tmp_path / 'out' / 'comparison.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  rows = {r['run']: r for r in json.loads((tmp_path / 'out' / 'table.json').read_text())['runs']}
  assert list(rows) == ['cooperllm', 'fedmezo']          # sorted, the log file passed over
  assert rows['fedmezo'] == {
      'run': 'fedmezo', 'algorithm': 'fedmezo', 'rounds': 2, 'accuracy_before': 0.2,
      'accuracy_after': 0.3, 'accuracy_best': 0.3, 'val_accuracy_after': 0.25, 'rollbacks': 1,
      'learning_rate_first': 0.1, 'learning_rate_last': 0.1, 'bytes_up_per_client': 8.0,
      'bytes_down_per_client': 12.0, 'sim_time_s': 3.0, 'train_seconds': 12.0}
  still_going = rows['cooperllm']
  assert (still_going['accuracy_after'], still_going['accuracy_best']) == (0.5, 0.6)
  assert still_going['train_seconds'] is None and still_going['rollbacks'] == 0
  assert '| cooperllm | cooperllm | 2 | 0.200 | 0.500 | 0.600 | — | 0 |' in proc.stdout
  # Rerun into the same --out (only its own files there): replaced.
  assert _compare(f'--runs={runs}/fedmezo', f'--out={tmp_path / "out"}').returncode == 0
  assert 'cooperllm' not in (tmp_path / 'out' / 'table.md').read_text()


@pytest.mark.parametrize('runs_flag, out, message', [
    ('{runs}/nothing*', 'out', "no run among the matches of '"),
    ('{runs}/sweep.log', 'out', 'sweep.log holds no run'),
    ('{runs}/*', 'runs/fedmezo', 'is one of the runs'),
    ('{runs}/*', 'mine', "holds 'notes.txt', which this command does not write"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, runs, runs_flag, out, message):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  before = sorted(p for p in tmp_path.rglob('*'))
  line = _error_line(_compare(f'--runs={runs_flag.format(runs=runs)}', f'--out={tmp_path / out}'))
  assert message in line
  assert sorted(p for p in tmp_path.rglob('*')) == before


def test_console_script_is_the_module():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert scripts['cooperllm-compare'] == 'cooperllm_jax.compare:main'

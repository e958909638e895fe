"""The absl entry point end to end on the real MiniLM and a small local CSV, and its bad inputs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cooperllm_jax.reporting import TB_GROUPS
from test_reporting import read_scalars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _csv(tmp_path, n=40, header='text,label'):
  words = {'sport': 'football match goal team score', 'money': 'bank market shares profit rate'}
  rng = np.random.default_rng(0)
  rows = [header]
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
@pytest.mark.parametrize('algorithm', ['cooperllm', 'fedmezo', 'fedavg_bp'])
def test_tiny_run_writes_metrics_summary_plot_and_events(tmp_path, algorithm):
  data = _csv(tmp_path, header='body,topic')   # a local file's own column names
  proc = _train(tmp_path / 'wd', f'--config=experiments/configs/demo.py:{algorithm}',
                f'--config.dataset={data}', '--config.text_column=body',
                '--config.label_column=topic', '--config.num_clients=2',
                '--config.clients_per_round=2', '--config.rounds=2', '--config.local_steps=2',
                '--config.batch_size=4', '--config.max_length=16', '--config.min_client_size=2',
                '--config.partition=iid', '--config.test_fraction=0.25', '--config.eval_every=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'summary: {algorithm} on tiny with minilm' in proc.stdout
  wd = tmp_path / 'wd'
  rows = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()]
  summary_d = 384 * 2 + 2                   # MiniLM's head, 2 classes: the trainable dimension
  assert [r['round'] for r in rows] == [0, 1, 2]
  assert all(0 <= r['test_accuracy'] <= 1 for r in rows)
  for r in rows[1:]:
    assert np.isfinite(r['train_loss']) and r['client_memory_bytes'] > 0 and r['wall_s'] > 0
    if algorithm != 'fedavg_bp':  # 2 clients x 2 steps x 1 central probe: scalars only
      assert r['forwards'] == 8 and r['backwards'] == 0
      assert r['bytes_up'] == 2 * (2 * 4 + 4)
    if algorithm == 'cooperllm':  # + every client receives the round's V (m = 1) and alpha
      assert r['alpha'] == 0.5 and r['basis_rank'] == 1
      assert r['bytes_down_per_client'] >= summary_d * 4 + 4
    elif algorithm == 'fedavg_bp':
      assert r['forwards'] == r['backwards'] == 4
      assert r['bytes_up'] > 4 * 22_000_000          # dense MiniLM deltas
  # The simulated clock (system/clock.py): every round takes time on the default devices.
  assert rows[0]['sim_time_s'] == 0.0
  assert all(r['sim_round_s'] > 0 for r in rows[1:])
  assert np.isclose(rows[2]['sim_time_s'], rows[1]['sim_round_s'] + rows[2]['sim_round_s'])
  guidance = 0 if algorithm != 'cooperllm' else 2 * (summary_d * 4 + 4)
  assert rows[1]['bytes_down'] == guidance and rows[2]['bytes_down'] > guidance
  summary = json.loads((wd / 'summary.json').read_text())
  assert summary['test_examples'] == 10
  assert summary['chance_accuracy'] == 0.5     # 5 + 5 test examples: the majority-class rate
  assert summary['jax'] == jax.__version__ and summary['device_kind'] == jax.devices()[0].device_kind
  assert 'experiments.train' in summary['command'] and '--config.text_column=body' in summary['command']
  assert (wd / 'partition.npz').exists()
  assert (wd / 'accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # TensorBoard: every scalar the run logs is in one of the named groups (none under other/).
  tags = {tag for tag, _, _ in read_scalars(wd / 'tb')}
  assert {'test/test_accuracy', 'train/train_loss', 'comm/bytes_up_per_client',
          'sim/sim_time_s'} <= tags
  assert {tag.split('/')[0] for tag in tags} <= set(TB_GROUPS), sorted(tags)
  if algorithm == 'cooperllm':
    assert {'cloud/alpha', 'cloud/basis_rank'} <= tags


def test_flags_files_name_registered_configs():
  from cooperllm_jax.federated.algorithms import ALGORITHMS
  flagdir = os.path.join(REPO, 'experiments', 'flags')
  named = set()
  for f in os.listdir(flagdir):
    lines = open(os.path.join(flagdir, f)).read().splitlines()
    config = [l for l in lines if l.startswith('--config=')]
    assert len(config) == 1, f
    named.add(config[0].split(':')[-1])
  assert set(ALGORITHMS) <= named


@pytest.mark.parametrize('flag, message', [
    ('--config.clients_per_round=20', 'clients_per_round=20 exceeds num_clients=10'),
    ('--config.learning_rate=-1', 'learning_rate must be finite and > 0'),
    ('--config.algorithm=nope', "unknown algorithm 'nope'"),
    ('--config.rounds=0', 'rounds must be >= 1'),
    ('--config.zo.eps=0', 'eps must be > 0'),
    ('--config.zo.trainable=most', "unknown trainable mode 'most'"),
    ('--config.zo.distribution=cauchy', "unknown distribution 'cauchy'"),
    ('--config.client_backend=gpu', "client_backend must be 'map' or 'loop'"),
    ('--config.zgr.alpha=1.5', 'zgr.alpha must be in [0, 1], got 1.5'),
    ('--config.weight_decay=-0.1', 'weight_decay must be >= 0'),
    ('--config.eval_every=0', 'eval_every must be >= 1'),
    ('--config.test_fraction=1.2', 'test_fraction must be in [0, 1)'),
    ('--config.faults.dropout=-0.1', 'faults.dropout must be in [0, 0.99]'),
    ('--config.faults.byzantine=1.5', 'faults.byzantine must be in [0, 1.0]'),
    ('--config.dp.clip=-1', 'dp.clip must be > 0'),
    ('--config.aggregation=mode', "unknown aggregation 'mode'"),
    ('--config.aggregation_trim=0.8', 'aggregation_trim must be in [0, 0.5]'),
    ('--config.guard.spike=0.5', 'guard.spike must be > 1'),
    ('--config.checkpoint_every=-1', 'checkpoint_every must be >= 0'),
    ('--config.system.clients=laptop', "unknown device profile 'laptop'"),
    ('--config.system.clients=edge_server', "'edge_server' is for the edge tier, not the end tier"),
    ('--config.system.clients=phone_midrange:x', "share 'x' is not a number"),
    ('--config.system.profiles=/nonexistent.json', "cannot read device profiles"),
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


def _train_on_a_terminal(workdir, *flags) -> str:
  """What a run prints to stderr when stderr is a terminal (a pseudo-terminal of 100 x 24: one of
  no width would get empty progress bars)."""
  # pylint: disable=g-import-not-at-top
  import fcntl
  import pty
  import struct
  import termios
  parent, child = pty.openpty()
  fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
  cmd = [sys.executable, '-m', 'experiments.train', f'--workdir={workdir}', *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=child,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  os.close(child)
  out = b''
  while True:
    try:
      chunk = os.read(parent, 4096)
    except OSError:   # the terminal closed: the process is gone
      break
    if not chunk:
      break
    out += chunk
  os.close(parent)
  proc.wait(timeout=300)
  return out.decode(errors='replace')


def test_progress_bars_only_on_a_terminal(tmp_path):
  """Reading a local file shows `datasets`' bar ('Generating train split') on a terminal unless
  --noprogress, and never when stderr is a file or a pipe (no carriage-return fragments in logs);
  the run stops right after (a column the file lacks), so no model is loaded."""
  flags = (f'--config.dataset={_csv(tmp_path)}', '--config.label_column=topic')
  shown = _train_on_a_terminal(tmp_path / 'a', *flags)
  silent = _train_on_a_terminal(tmp_path / 'b', *flags, '--noprogress')
  piped = _train(tmp_path / 'c', *flags)
  assert "no column 'topic' (label_column)" in _error_line(piped)
  assert "no column 'topic' (label_column)" in shown and 'Generating train split' in shown
  assert "no column 'topic' (label_column)" in silent and 'Generating train split' not in silent
  assert 'Generating train split' not in piped.stderr and '\r' not in piped.stderr


def test_help_lists_every_config_field_with_its_meaning():
  """--help: the command's flags and one line per config field with its meaning, the typed
  config's field metadata (config.field): a field without one, an algorithm section's too, fails
  here."""
  from cooperllm_jax import cli  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, '-m', 'experiments.train', '--help'], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--print_config' in proc.stdout and '--workdir' in proc.stdout
  meanings = cli.config_fields()
  assert {'algorithm', 'rounds', 'dataset', 'zo.lora_targets', 'zgr.pool_size'} <= set(meanings)
  lines = proc.stdout.splitlines()
  for key, meaning in meanings.items():
    assert meaning, f'config field {key} has no meaning (config.field(default, meaning))'
    line = next(l for l in lines if l.split()[:1] == [key])
    assert line.split()[1:] == meaning.split()[:len(line.split()) - 1], key


def _print_config(*flags) -> str:
  proc = subprocess.run([sys.executable, '-m', 'experiments.train', '--print_config', *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def test_print_config_and_an_algorithm_given_either_way():
  """--print_config shows every resolved field (no workdir needed, nothing run); demo.py:fedmezo
  and --config.algorithm=fedmezo are one run (fedmezo's tuned rate and rounds), the overrides on
  top either way."""
  by_file = _print_config('--config=experiments/configs/demo.py:fedmezo', '--config.seed=3')
  by_field = _print_config('--config.algorithm=fedmezo', '--config.seed=3')
  over_another = _print_config('--config=experiments/configs/demo.py:cooperllm',
                               '--config.algorithm=fedmezo', '--config.seed=3')
  assert by_file == by_field == over_another
  values = dict(l.split(' = ', 1) for l in by_file.splitlines())
  assert (values['algorithm'], values['seed'], values['learning_rate'], values['rounds']) == (
      "'fedmezo'", '3', '0.05', '40')
  assert values['zo.eps'] == '0.001' and "'cooperllm'" not in by_file
  assert "algorithm = 'cooperllm'" in _print_config()


@pytest.mark.slow
def test_rollbacks_are_in_the_summary_line_and_json(tmp_path):
  """The divergence guard's rollbacks (a rate far too high for threefry's Gaussian directions, a
  hair-trigger guard) are counted in summary.json and named in the summary line, as in
  metrics.jsonl."""
  proc = _train(tmp_path / 'wd', '--config.algorithm=fedmezo', f'--config.dataset={_csv(tmp_path)}',
                '--config.num_clients=2', '--config.clients_per_round=2', '--config.rounds=4',
                '--config.local_steps=1', '--config.batch_size=4', '--config.max_length=16',
                '--config.min_client_size=2', '--config.partition=iid',
                '--config.test_fraction=0.25', '--config.learning_rate=3',
                '--config.guard.spike=1.01', '--config.guard.window=1',
                '--config.guard.max_rollbacks=100', '--config.checkpoint_every=0',
                '--config.zo.distribution=gaussian')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / 'wd' / 'metrics.jsonl').read_text().splitlines()]
  rollbacks = sum(bool(r.get('rollback')) for r in rows)
  assert rollbacks > 0
  assert json.loads((tmp_path / 'wd' / 'summary.json').read_text())['rollbacks'] == rollbacks
  assert f'; {rollbacks} rollback' in proc.stdout and 'halving the learning rate' in proc.stdout

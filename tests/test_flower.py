"""The tiers as processes on Flower (cooperllm_jax/deploy) on loopback: a deployed run gives the
in-process run's models bit for bit after every round and a ledger experiments.replay rebuilds, also
when its edge is killed and resumed; an end device killed mid-round is a dropout and the run goes
on; the launcher leaves no process behind and refuses bad input in one line."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('flwr')

from test_experiment import REPO, _csv, _error_line  # pylint: disable=g-import-not-at-top
from test_resume import _ledger, _restore_raw  # pylint: disable=g-import-not-at-top

from cooperllm_jax.deploy import procs, wire  # pylint: disable=g-import-not-at-top

ROUNDS = 2
TINY = ('--config=experiments/configs/demo.py:cooperllm', '--config.num_clients=2',
        '--config.clients_per_round=2', '--config.local_steps=2', '--config.batch_size=4',
        '--config.max_length=16', '--config.min_client_size=2', '--config.partition=iid',
        '--config.test_fraction=0.25', '--config.eval_every=1', '--config.checkpoint_every=1')


def _flags(tmp_path, rounds=ROUNDS):
  return (*TINY, f'--config.dataset={_csv(tmp_path)}', f'--config.rounds={rounds}')


def _launch(workdir, *flags):
  """The local federation's command, started (its output in workdir.log)."""
  cmd = [sys.executable, '-m', 'cooperllm_jax.deploy.local', f'--workdir={workdir}', *flags]
  log = open(f'{workdir}.log', 'ab')  # pylint: disable=consider-using-with
  return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _wait(condition, proc, what, timeout=400):
  """Waits for condition() while proc runs; fails naming `what` otherwise."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if condition():
      return
    time.sleep(0.1)
  pytest.fail(f'{what}: not seen (launcher exit {proc.poll()})')


def _rounds(run):
  path = run / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines()[1:] if l.endswith('}')]


def _alive(pids):
  return [p for p in pids if pathlib.Path(f'/proc/{p}').exists()
          and 'Z' not in pathlib.Path(f'/proc/{p}/stat').read_text().split(')')[-1][:3]]


def _tree(workdir):
  """The ids of every process of the running federation (the launcher's pids.json, descendants)."""
  pids = json.loads((workdir / 'flower' / procs.PIDS).read_text())
  return pids, {q for p in pids.values() for q in {p} | procs.descendants(p)}


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_a_deployed_run_is_the_in_process_run_bit_for_bit_also_after_its_edge_is_killed(tmp_path):
  """Round 1 deployed, the edge (the ServerApp's process) killed, the run resumed to round 2:
  every round's model equals the in-process run's, and the ledger replays."""
  flags = _flags(tmp_path)
  reference = tmp_path / 'reference'   # the CLI's in-process run, beside the federation
  inline = subprocess.Popen([sys.executable, '-m', 'experiments.train', f'--workdir={reference}',
                             *flags, '--progress=false'], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(f'{reference}.log', 'wb'),
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  fed = tmp_path / 'fed'
  proc = _launch(fed, *flags, '--round_timeout=300')
  try:
    saved = fed / 'run' / 'checkpoints' / '1' / 'commit_success.txt'   # orbax's last write
    _wait(saved.exists, proc, 'the checkpoint of round 1 of the deployed run')
    pids, _ = _tree(fed)
    edges = [p for p in procs.descendants(pids['superlink'])
             if b'flwr-serverapp' in pathlib.Path(f'/proc/{p}/cmdline').read_bytes()]
    assert len(edges) == 1
    os.kill(edges[0], signal.SIGKILL)
    assert proc.wait(120) == 2
  finally:
    proc.kill()
  assert 'the edge ended without finishing the run' in pathlib.Path(f'{fed}.log').read_text()
  resumed = _launch(fed, *flags, '--round_timeout=300', '--resume')
  assert resumed.wait(400) == 0, pathlib.Path(f'{fed}.log').read_text()[-3000:]
  assert inline.wait(400) == 0, pathlib.Path(f'{reference}.log').read_text()[-2000:]
  for r in range(1, ROUNDS + 1):
    assert _bits(_restore_raw(fed / 'run', r)) == _bits(_restore_raw(reference, r)), r
  assert [r['round'] for r in _rounds(fed / 'run')] == list(range(1, ROUNDS + 1))
  ledger, expected = _ledger(fed / 'run'), _ledger(reference)
  assert ledger.keys() == expected.keys()
  for name, arrays in expected.items():
    for k, v in arrays.items():
      np.testing.assert_array_equal(ledger[name][k], v)
  replay = subprocess.run([sys.executable, '-m', 'experiments.replay', f'--workdir={fed / "run"}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert replay.returncode == 0 and 'equal bit for bit' in replay.stdout, replay.stderr[-2000:]


@pytest.mark.slow
def test_an_end_device_killed_mid_round_is_a_dropout_and_the_run_goes_on(tmp_path):
  """End device 1 dies while it trains in round 1: round 1 completes with it missing (weight 0 in
  the ledger), round 2 runs without it, and the launcher leaves no process behind."""
  fed = tmp_path / 'fed'
  proc = _launch(fed, *_flags(tmp_path, rounds=2), '--round_timeout=300')
  try:
    node_log = fed / 'flower' / 'logs' / 'node1.log'
    _wait(lambda: node_log.exists() and 'end device 1: round 1' in node_log.read_text(), proc,
          'end device 1 training round 1')
    pids, tree = _tree(fed)
    device = {pids['node1']} | procs.descendants(pids['node1'])
    for pid in device:
      procs.send(pid, signal.SIGKILL)
    assert proc.wait(400) == 0, pathlib.Path(f'{fed}.log').read_text()[-3000:]
  finally:
    proc.kill()
  assert not _alive(tree | device)
  rows = _rounds(fed / 'run')
  assert [r['round'] for r in rows] == [1, 2]
  assert [r['missing'] for r in rows] == [1, 1]
  for r in (1, 2):   # the ledger records the dropout: weight 0, no scalars
    with np.load(fed / 'run' / 'ledger' / f'{r:08d}.npz') as z:
      assert z['client_weights'][1] == 0 and z['client_weights'][0] > 0
      assert not z['weights'][1].any()


def test_bad_input_is_one_error_line_and_nothing_runs(tmp_path):
  """A bad flag, too many end devices or a non-empty workdir: one line, exit 2."""
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  tiny = _flags(tmp_path)
  for flags, says in ((('--nodes=5',), '--nodes=5'), (('--round_timeout=0',), 'positive'),
                      (('--resume',), 'holds no run'),
                      (('--config.algorithm=fedavg_bp',), 'cannot be deployed')):
    workdir = tmp_path / 'fed'
    cmd = [sys.executable, '-m', 'cooperllm_jax.deploy.local', f'--workdir={workdir}',
           *tiny, *flags]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert says in _error_line(done), done.stderr
    assert not workdir.exists()
  done = subprocess.run([sys.executable, '-m', 'cooperllm_jax.deploy.local',
                         f'--workdir={tmp_path / "full"}', *tiny], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert 'not empty' in _error_line(done)


def test_the_wire_keeps_every_dtype_and_bit():
  """bfloat16 and int4 leaves (which Flower's numpy arrays lose) arrive as they left."""
  rng = np.random.default_rng(0)
  tree = {'w': jnp.asarray(rng.normal(size=(3, 5)), jnp.bfloat16),
          'q': jnp.asarray(rng.integers(-8, 8, size=(4, 2)), jnp.int4),
          'lr': np.float32(0.01), 'none': None, 'ids': np.arange(3, dtype=np.int32)}
  back = wire.decode(wire.encode(tree), {'w': 0, 'q': 0, 'lr': 0, 'none': None, 'ids': 0})
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert np.asarray(a).dtype == b.dtype and np.asarray(a).shape == b.shape
    assert np.asarray(a).tobytes() == b.tobytes()
  with pytest.raises(ValueError, match='3 arrays for a tree of 1 leaves'):
    wire.decode(wire.encode([1, 2, 3]), [0])

"""Clients across devices and processes (cooperllm_jax/mesh.py, cooperllm_jax/distributed.py): a run
whose 8 clients per round are split over a mesh's 'clients' axis equals the one-device run, only
the uplink scalars cross devices, each process loads only its own clients, and two jax.distributed
processes on localhost agree with one process.

The device count is fixed when JAX starts, so the multi-device runs are subprocesses (8 simulated
CPU devices; 2 processes x 2) that print one JSON line; the checks read it.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_zo_algorithms as tz
from cooperllm_jax import distributed
from cooperllm_jax.config import parse
from cooperllm_jax.mesh import make_mesh
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax import mesh as mesh_lib
from cooperllm_jax.federated.algorithms import make_algorithm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS, ROUNDS = 8, 2
PARTS = np.array_split(np.random.default_rng(1).permutation(len(tz.DATA['labels'])), CLIENTS)
SAMPLED = np.arange(CLIENTS, dtype=np.int32)


def run(name, mesh=None):
  """ROUNDS rounds of all 8 clients, each process loading its clients' batches through
  host_local_batches; returns per-round lists (JSON-ready) and the ids each load asked for."""
  over = {} if mesh is None else {'mesh': dict(zip(('clients', 'data', 'model'), mesh))}
  alg = make_algorithm(tz.config(name, **over), tz.MODEL, tz.PUBLIC)
  state = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  loads, rounds = [], []
  for r in range(1, ROUNDS + 1):
    def load(ids, r=r):
      loads.append(ids.tolist())
      return client_data.round_batches(tz.DATA, tz.DATA['labels'], PARTS, ids, tz.STEPS,
                                       tz.BATCH, 0, r)
    batches, counts = mesh_lib.host_local_batches(alg.mesh, SAMPLED, load)
    state, result = alg.run_round(state, batches, counts, SAMPLED, r)
    leaves = jax.tree.leaves(state.trainable)
    rounds.append({'trainable': [np.asarray(x).tolist() for x in leaves],
                   'addresses': result.uplink.addresses.tolist(),
                   'scalars': result.uplink.scalars.tolist(), 'losses': result.losses.tolist()})
  return alg, state, batches, {'rounds': rounds, 'loads': loads}


def feature_l1_bound() -> float:
  """max over the task's examples of |f|_1, f the pooled features the head reads (the trunk is
  frozen: only the head trains, so the features are the same in every round)."""
  params = jax.tree.map(jnp.asarray, tz.PARAMS_NP)
  batch = {k: jnp.asarray(v) for k, v in tz.DATA.items()}
  pooled = tz.MODEL.pool(params['head'], tz.MODEL.hidden(params, batch), batch['attention_mask'])
  return float(jnp.abs(pooled).sum(-1).max())


def assert_same_run(got, ref, name):
  """Same ledger addresses; losses, scalars and weights equal up to float32 rounding.

  Each device runs the one-device per-client program on the same inputs and the edge the same
  replay, so on CPU the runs come out bitwise equal (measured: max difference 0). The bounds allow
  a compiler that fuses a 1-client map differently, or a cloud split over 'data' that sums its
  gradient in another order (an ulp in the guidance): either puts an ulp or two on a loss, which
  moves g by ~ulp(L) / eps (see test_zo_algorithms.test_client_backends_agree), bounded here by
  4 ulp(L) / eps; a weight moves by lr x that per step and |z| entry (< 8, guided ones included),
  over S steps and r rounds: w_tol. A loss is measured at weights that differ by at most w_tol, and
  cross-entropy is 2-Lipschitz in the logits' max norm, whose change is at most
  (|f|_1 + 1) w_tol for the head's features f and bias: the loss bound is 4 ulp(L) plus
  2 (|f|_1 + 1) w_tol. A wrong client, count or address is off by far more (`moved`)."""
  lr = tz.config(name).learning_rate
  eps = tz.config(name).zo.eps
  lipschitz = 2 * (feature_l1_bound() + 1)
  for r, (a, b) in enumerate(zip(got['rounds'], ref['rounds']), 1):
    np.testing.assert_array_equal(a['addresses'], b['addresses'])
    ulp = np.spacing(np.float32(np.abs(b['losses']).max()))
    g_tol = 4 * ulp / eps
    w_tol = r * lr * tz.STEPS * g_tol * 8
    np.testing.assert_allclose(a['losses'], b['losses'], rtol=0, atol=4 * ulp + lipschitz * w_tol)
    np.testing.assert_allclose(a['scalars'], b['scalars'], rtol=0, atol=g_tol)
    for x, y in zip(a['trainable'], b['trainable']):
      np.testing.assert_allclose(x, y, rtol=0, atol=w_tol, err_msg=f'{name} round {r}')
  start = jax.tree.leaves(tz.PARAMS_NP['head'])
  moved = max(np.abs(np.asarray(x) - s).max()
              for x, s in zip(ref['rounds'][-1]['trainable'], start))
  assert moved > 10 * w_tol, (moved, w_tol)


def max_abs_diff(got, ref) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for a, b in zip(got['rounds'], ref['rounds'])
             for x, y in zip(a['trainable'] + [a['scalars']], b['trainable'] + [b['scalars']]))


# ---- one process, 8 devices ----------------------------------------------------------------------

EIGHT_DEVICES = r'''
import json, re, sys
import jax, numpy as np
jax.config.update('jax_default_matmul_precision', 'highest')
sys.path.insert(0, 'tests')
import test_mesh as tm
import test_zo_algorithms as tz
from cooperllm_jax.mesh import make_mesh
from cooperllm_jax.errors import ConfigError
from cooperllm_jax import mesh as mesh_lib
from cooperllm_jax.federated.algorithms import make_algorithm

assert len(jax.devices()) == 8, jax.devices()
ROUND = tm.ROUNDS
out = {}
for name in ('fedmezo', 'cooperllm'):
  _, _, _, out[name + '_one'] = tm.run(name)
  alg, state, batches, out[name + '_mesh'] = tm.run(name, (8, 1, 1))
  x, leaves = batches['input_ids'], jax.tree.leaves(state.trainable)
  out[name + '_facts'] = {
      'mesh': dict(alg.mesh.shape), 'batch_spec': list(x.sharding.spec),
      'batch_shards': sorted({tuple(s.data.shape) for s in x.addressable_shards}),
      'trainable_spec': [list(y.sharding.spec) for y in leaves],
      'trainable_devices': sorted({len(y.sharding.device_set) for y in leaves}),
      'replicated': all(y.is_fully_replicated for y in jax.tree.leaves(state))}
  if name == 'cooperllm':
    out[name + '_facts']['cloud_mesh'] = dict(alg.guidance.cloud_mesh.shape)
  else:  # the clients' program its rounds ran, compiled for its last round's inputs
    batches, _, clients, r = mesh_lib.place_round(alg.mesh, batches, None, tm.SAMPLED, ROUND)
    compiled = alg.round.clients.lower(state.trainable, state.frozen, batches, clients, r,
                                  state.lr).compile()

# That program: batches enter split over 'clients', one client per device, and the only
# collectives gather the uplinks and losses.
in_sh = compiled.input_shardings[0]
hlo = compiled.as_text()
entry = hlo[hlo.index('ENTRY'):]
out['compiled'] = {
    'batch_specs': {k: list(s.spec) for k, s in in_sh[2].items()},
    'trainable_specs': [list(s.spec) for s in jax.tree.leaves(in_sh[0])],
    'out_specs': [list(s.spec) for s in jax.tree.leaves(compiled.output_shardings)],
    'collectives': sorted(re.findall(
        r'= (\w+\[[\d,]*\])\{[^}]*\} (all-gather|all-reduce|all-to-all|collective-permute|'
        r'reduce-scatter)\(', hlo)),
    'entry_int_params': sorted(set(re.findall(r'(s32\[[\d,]+\])\{[^}]*\} parameter', entry)))}

errors = {}
def error(key, fn):
  try:
    fn()
  except ConfigError as e:
    errors[key] = str(e)
mesh8 = {'clients': 8, 'data': 1, 'model': 1}
error('uneven', lambda: mesh_lib.place_round(alg.mesh, {'x': np.zeros((6, 2))}, np.ones(6),
                                             np.arange(6), 1))
error('cloud_devices', lambda: make_algorithm(
    tz.config('cooperllm', mesh=mesh8, cloud={'devices': 4}), tz.MODEL, tz.PUBLIC))
error('fedavg_bp', lambda: make_algorithm(tz.config('fedavg_bp', mesh=mesh8), tz.MODEL))
error('loop', lambda: make_algorithm(tz.config('fedmezo', mesh=mesh8, client_backend='loop'),
                                     tz.MODEL))
error('make_mesh', lambda: make_mesh(clients=3))
error('per_round', lambda: make_algorithm(tz.config('fedmezo', mesh=mesh8, clients_per_round=6),
                                          tz.MODEL))
out['errors'] = errors
out['all_clients'] = dict(make_mesh(data=1, model=2, clients=-1).shape)
print('RESULT ' + json.dumps(out))
'''


def _subprocess_env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu')


def _result(stdout: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith('RESULT ')]
  return json.loads(lines[-1][len('RESULT '):]) if lines else None


@pytest.fixture(scope='module')
def eight():
  proc = subprocess.run([sys.executable, '-c', EIGHT_DEVICES], cwd=REPO, env=_subprocess_env(8),
                        capture_output=True, text=True, timeout=600)
  out = _result(proc.stdout)
  assert proc.returncode == 0 and out, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out


@pytest.mark.slow
@pytest.mark.parametrize('name', ['fedmezo', 'cooperllm'])
def test_eight_devices_match_one_device(eight, name):
  assert_same_run(eight[name + '_mesh'], eight[name + '_one'], name)
  diff = max_abs_diff(eight[name + '_mesh'], eight[name + '_one'])
  print(f'{name}: 8 devices vs 1, max |difference| {diff}')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['fedmezo', 'cooperllm'])
def test_clients_are_split_and_the_state_replicated(eight, name):
  facts = eight[name + '_facts']
  assert facts['mesh'] == {'clients': 8, 'data': 1, 'model': 1}
  assert facts['batch_spec'] == ['clients']
  assert facts['batch_shards'] == [[1, tz.STEPS, tz.BATCH, 8]]       # one client per device
  assert all(spec == [] for spec in facts['trainable_spec']) and facts['trainable_devices'] == [8]
  assert facts['replicated']
  # Host-local loading: every device's client was loaded on its own, once per round.
  assert eight[name + '_mesh']['loads'] == [[c] for c in range(CLIENTS)] * ROUNDS
  assert eight[name + '_one']['loads'] == [list(range(CLIENTS))] * ROUNDS
  if name == 'cooperllm':
    assert facts['cloud_mesh'] == facts['mesh']           # the cloud on the run's mesh


@pytest.mark.slow
def test_only_uplinks_cross_devices(eight):
  c = eight['compiled']
  assert c['batch_specs'] == {k: ['clients'] for k in ('attention_mask', 'input_ids', 'labels')}
  assert all(spec == [] for spec in c['trainable_specs'] + c['out_specs']), c   # replicated
  p = 2  # probes
  # Each device holds one client's batches; the compiled program gathers the [C, S, P] ledger
  # (addresses, scalars, weights) and the [C, S] losses, and moves nothing else.
  assert f's32[1,{tz.STEPS},{tz.BATCH},8]' in c['entry_int_params'], c
  assert c['collectives'] == sorted([
      [f'f32[{CLIENTS},{tz.STEPS},{p}]', 'all-gather'],
      [f'f32[{CLIENTS},{tz.STEPS},{p}]', 'all-gather'],
      [f'f32[{CLIENTS},{tz.STEPS}]', 'all-gather'],
      [f's32[{CLIENTS},{tz.STEPS},{p},4]', 'all-gather']]), c


@pytest.mark.slow
def test_mesh_errors_are_one_line_config_errors(eight):
  e = eight['errors']
  assert set(e) == {'uneven', 'per_round', 'cloud_devices', 'fedavg_bp', 'loop', 'make_mesh'}, e
  for key in ('uneven', 'per_round'):
    assert e[key].startswith('6 clients per round do not split evenly'), e[key]
    assert 'multiple of 8' in e[key]
  assert 'cloud.devices=4' in e['cloud_devices'] and 'mesh' in e['cloud_devices']
  assert 'fedavg_bp' in e['fedavg_bp'] and 'loop' in e['loop']
  assert 'does not divide the 8 devices' in e['make_mesh']
  assert all('\n' not in m for m in e.values())
  assert eight['all_clients'] == {'clients': 4, 'data': 1, 'model': 2}


# ---- two processes x 2 devices -------------------------------------------------------------------

TWO_PROCESSES = r'''
import json, sys
process_id, port = int(sys.argv[1]), sys.argv[2]
from cooperllm_jax import distributed
how = distributed.initialize(f'localhost:{port}', 2, process_id)
import jax
jax.config.update('jax_default_matmul_precision', 'highest')
sys.path.insert(0, 'tests')
import test_mesh as tm
out = {'how': how, 'process': jax.process_index(), 'processes': jax.process_count(),
       'devices': jax.device_count(), 'local': jax.local_device_count()}
# fedmezo: the clients axis (4) spans both processes. cooperllm: clients (2) across the processes,
# the cloud's FSDP over 'data' (2) within each.
for name, mesh in (('fedmezo', (-1, 1, 1)), ('cooperllm', (2, 2, 1))):
  alg, state, _, out[name] = tm.run(name, mesh)
  out[name]['mesh'] = dict(alg.mesh.shape)
print('RESULT ' + json.dumps(out))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def two(eight):
  del eight  # its one-device runs are the reference; run it first so the two do not share the CPU
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, '-c', TWO_PROCESSES, str(i), port], cwd=REPO,
                            env=_subprocess_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=600)
      outs.append((p.returncode, _result(stdout), stdout[-2000:] + stderr[-3000:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, result, log in outs:
    assert code == 0 and result, log
  return [result for _, result, _ in outs]


@pytest.mark.slow
def test_two_processes_agree_with_one_process(two, eight):
  for i, out in enumerate(two):
    assert (out['how'], out['process'], out['processes'], out['devices'], out['local']) == (
        'flags', i, 2, 4, 2)
  assert two[0]['fedmezo']['mesh'] == {'clients': 4, 'data': 1, 'model': 1}
  assert two[0]['cooperllm']['mesh'] == {'clients': 2, 'data': 2, 'model': 1}
  for name in ('fedmezo', 'cooperllm'):
    # Both processes hold the same replicated global model, bit for bit.
    assert two[0][name]['rounds'] == two[1][name]['rounds']
    # ... equal to one process's (cooperllm's cloud sums its data shards in another order: an ulp
    # in the direction, which the same bound covers; see assert_same_run).
    assert_same_run(two[0][name], eight[name + '_one'], name)
    diff = max_abs_diff(two[0][name], eight[name + '_one'])
    print(f'{name}: 2 processes vs 1, max |difference| {diff}')
  # Each process loaded only the clients on its own devices: 2 per device for fedmezo, and for
  # cooperllm 4 per clients-axis position (its 2 'data' devices share one load).
  assert two[0]['fedmezo']['loads'] == [[0, 1], [2, 3]] * ROUNDS
  assert two[1]['fedmezo']['loads'] == [[4, 5], [6, 7]] * ROUNDS
  assert two[0]['cooperllm']['loads'] == [[0, 1, 2, 3]] * ROUNDS
  assert two[1]['cooperllm']['loads'] == [[4, 5, 6, 7]] * ROUNDS


# ---- in-process: defaults, errors, launcher detection --------------------------------------------

def test_default_config_has_no_mesh_and_a_mesh_has_three_axes():
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  for c in (demo.get_config('fedmezo'), tz.config('fedmezo')):   # 1 x 1 x 1; a config without mesh
    cfg = parse(c)
    assert mesh_lib.for_run(cfg.mesh, cfg.clients_per_round) is None
  assert dict(make_mesh().shape) == {'clients': 1, 'data': len(jax.devices()), 'model': 1}
  with pytest.raises(ConfigError, match='not both'):
    make_mesh(data=-1, clients=-1)
  with pytest.raises(ConfigError, match='>= 1'):
    make_mesh(clients=0)
  loads = []   # without a mesh, one load of the whole round
  out = mesh_lib.host_local_batches(None, SAMPLED, lambda ids: loads.append(ids) or ('b', 'c'))
  assert out == ('b', 'c') and len(loads) == 1 and loads[0] is SAMPLED


SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'gpu[01-02]', 'SLURM_NTASKS': '16',
         'SLURM_PROCID': '3', 'SLURM_LOCALID': '3'}


@pytest.mark.parametrize('environ,expected', [
    ({}, None), (SLURM, 'slurm'), (dict(SLURM, SLURM_NTASKS='1'), None),
    ({k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'}, None),   # salloc shell
    ({'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:5'}, 'openmpi'),
    ({'OMPI_COMM_WORLD_SIZE': '1', 'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:5'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu'), ({'TPU_WORKER_HOSTNAMES': 'w0'}, None),
    ({'COOPERLLM_DISTRIBUTED': '1'}, 'opt-in')])
def test_launcher_detection(environ, expected):
  assert distributed.cluster(environ) == expected


def test_distributed_flags_go_together_and_a_single_process_starts_nothing():
  with pytest.raises(ConfigError, match='go together'):
    distributed.initialize('localhost:1234', None, 0)
  with pytest.raises(ConfigError, match='process_id=2'):
    distributed.initialize('localhost:1234', 2, 2)
  assert distributed.initialize(environ={}) is None

"""The package's shape: no import cycles, no algorithm names compared outside the registry, typed
algorithm states, one algorithm = one file plus a registry line (a toy one registered here), typed
config parsing."""

import ast
import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import test_zo_algorithms as tz
from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import clients as clients_lib
from cooperllm_jax.federated import registry
from cooperllm_jax.federated.algorithms import make_algorithm
from cooperllm_jax.federated.algorithms.scalar import ScalarProtocol

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'cooperllm_jax'


def _modules() -> dict:
  """{module name: path} of every module of the package (kernels/ installs as .kernels)."""
  out = {}
  for root, prefix in ((PACKAGE, 'cooperllm_jax'), (REPO / 'kernels', 'cooperllm_jax.kernels')):
    for path in root.rglob('*.py'):
      parts = list(path.relative_to(root).with_suffix('').parts)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join([prefix] + parts)] = path
  return out


def _imports(path: pathlib.Path, modules: dict) -> set:
  """The package modules a file imports anywhere (a function-level import is an edge too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    found |= {n for n in names if n in modules}
  return found


def test_the_package_has_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  # A package's __init__ may import its own submodules (re-exports), and a submodule importing
  # `cooperllm_jax.x` also runs cooperllm_jax/__init__; those parent links are not cycles of ours.
  for m in graph:
    graph[m] = {d for d in graph[m] if not m.startswith(d + '.')}
  state, cycle = {}, []

  def visit(m, stack):
    state[m] = 'open'
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        cycle.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
      elif d not in state:
        visit(d, stack + [d])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycle, cycle[:3]
  # ... and every module imports on its own in a fresh interpreter.
  code = ';'.join(f'import {m}' for m in sorted(modules))
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_algorithm_name_is_compared_outside_the_registry():
  offenders = []
  for path in PACKAGE.rglob('*.py'):
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if 'algorithm ==' in line or 'self.name ==' in line or '.algorithm in ' in line:
        offenders.append(f'{path.relative_to(REPO)}:{i}: {line.strip()}')
  assert not offenders, offenders


def test_states_are_read_by_their_typed_fields():
  """Algorithm states are NamedTuples (api.ServerState and each algorithm's own): no key lookups."""
  offenders = []
  for path in PACKAGE.rglob('*.py'):
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if 'state[' in line or 'state.get(' in line:
        offenders.append(f'{path.relative_to(REPO)}:{i}: {line.strip()}')
  assert not offenders, offenders


@registry.register('toy_shared_probe')
class SharedProbeToy(ScalarProtocol):
  """A test-only algorithm: one direction per (round, step, probe) that every client shares
  (DeComFL's addressing) but with FedMeZO's per-client replay. One class, one registry line."""

  def addresses(self):
    return clients_lib.shared_addresses


def test_a_new_algorithm_is_one_class_and_a_registry_line():
  assert 'toy_shared_probe' in registry.names()
  alg = make_algorithm(tz.config('toy_shared_probe'), tz.MODEL)
  assert isinstance(alg, SharedProbeToy) and alg.name == 'toy_shared_probe'
  state = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  before = tz.full_loss(alg.model_params(state))
  for r in range(1, 7):
    state, result = alg.run_round(state, tz.round_batches(r), tz.COUNTS, tz.CLIENT_IDS, r)
    # Shared addresses: every client probed the same directions this round.
    addresses = np.asarray(result.uplink.addresses)
    assert (addresses == addresses[:1]).all() and (addresses[..., 1] == -1).all()
  assert tz.full_loss(alg.model_params(state)) < before - 0.05


def test_parse_fills_defaults_and_rejects_unknown_keys_with_a_suggestion():
  cfg = config_lib.parse(tz.config('fedmezo'))     # a config without most sections
  assert cfg.faults == config_lib.Faults() and cfg.checkpoint == config_lib.Checkpoint()
  assert cfg.zo.probes == 2 and cfg.zo.estimator.probes == 2 and cfg.zo.subset.mode == 'head'
  with pytest.raises(ConfigError, match=r'unknown config field learning_rat; did you mean '
                                        r'learning_rate\?'):
    config_lib.parse(ml_collections.ConfigDict({'learning_rat': 0.1}))
  with pytest.raises(ConfigError, match=r'unknown config field zo\.epz; did you mean zo\.eps\?'):
    config_lib.parse(ml_collections.ConfigDict({'zo': {'epz': 0.1}}))
  # Flat ConfigDict fields land in their sections.
  c = tz.config('fedmezo', checkpoint_every=0, keep_checkpoints=2, aggregation='median')
  cfg = config_lib.parse(c)
  assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.aggregation.rule) == (0, 2, 'median')
  assert dataclasses.is_dataclass(cfg) and config_lib.parse(cfg) is cfg


@pytest.mark.parametrize('over,match', [
    (dict(learning_rate=float('inf')), 'learning_rate'), (dict(learning_rate=0.0), 'learning_rate'),
    (dict(seed=-1), 'seed'), (dict(dtype='float64'), 'dtype'), (dict(rounds=0), 'rounds'),
    (dict(clients_per_round=20, num_clients=4), 'clients_per_round'),
    (dict(test_fraction=1.0), 'test_fraction'), (dict(keep_checkpoints=0), 'keep_checkpoints'),
    (dict(guard={'spike': 0.5}), 'guard.spike'), (dict(dp={'clip': 1.0, 'noise': 0.0}), 'dp.noise'),
    (dict(system={'clients': 'toaster'}), 'toaster'), (dict(rounds='ten'), 'rounds'),
    (dict(text_column=''), 'text_column must be a column name'),
    (dict(label_column=3), 'label_column must be a column name'),
    (dict(text_column='label'), 'text_column and label_column are both'),
    (dict(label_names=('a', 'a')), 'label_names must be distinct'),
    (dict(label_names=('a', '')), 'label_names must be distinct non-empty')])
def test_parse_validates_values_once_with_one_line_errors(over, match):
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.parse(tz.config('fedmezo', **over))
  assert '\n' not in str(e.value)

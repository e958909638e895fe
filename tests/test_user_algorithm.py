"""Algorithms from the user's code and the algorithms' own config sections: examples/
server_momentum.py (outside the package) registered through algorithm_module, trained through the
CLI with its own config field and replayed bit for bit; fwdllm's and fedkseed's sections, which
finished runs' config.json files name by their former zo.* keys."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import test_zo_algorithms as tz
from test_experiment import REPO, _csv, _train
from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import registry
from cooperllm_jax.federated.algorithms import make_algorithm

MODULE = 'examples.server_momentum'


def _config(**over):
  return tz.config('fedmezo_momentum', algorithm_module=MODULE, **over)


def test_algorithm_module_registers_the_algorithm_and_its_section():
  cfg = config_lib.parse(_config(fedmezo_momentum={'momentum': 0.5}))
  assert cfg.fedmezo_momentum.momentum == 0.5 and 'fedmezo_momentum' in registry.names()
  assert config_lib.parse(_config()).fedmezo_momentum.momentum == 0.9     # its default
  with pytest.raises(ConfigError, match=r'unknown config field fedmezo_momentum\.momentun; did '
                                        r'you mean fedmezo_momentum\.momentum\?'):
    config_lib.parse(_config(fedmezo_momentum={'momentun': 0.5}))
  with pytest.raises(ConfigError, match=r'fedmezo_momentum\.momentum must be in \[0, 1\)'):
    config_lib.parse(_config(fedmezo_momentum={'momentum': 1.5}))
  with pytest.raises(ConfigError, match="algorithm_module 'examples.nothing_here' cannot be "
                                        'imported') as e:
    config_lib.parse(tz.config('fedmezo', algorithm_module='examples.nothing_here'))
  assert '\n' not in str(e.value)


def test_momentum_rounds_donate_the_state_and_edge_update_replays_them():
  """Three rounds of the user's algorithm (its after_edge reads the weights the round donated),
  then its edge_update over the received uplinks from the start: the same state, bit for bit."""
  alg = make_algorithm(_config(fedmezo_momentum={'momentum': 0.5}), tz.MODEL)
  start = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  state, results = jax.tree.map(jnp.copy, start), []
  for r in range(1, 4):
    state, result = alg.run_round(state, tz.round_batches(r), tz.COUNTS, tz.CLIENT_IDS, r)
    results.append(result)
  replayed = start._replace(frozen=None)
  for result in results:
    replayed = alg.edge_update(replayed, result.uplink, result.client_weights)
  for x, y in zip(jax.tree.leaves(state._replace(frozen=None)), jax.tree.leaves(replayed)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert any(np.abs(np.asarray(v)).max() > 0 for v in jax.tree.leaves(state.extra.velocity))
  plain = tz.history('fedmezo', rounds=3)['states'][3].trainable
  assert tz.max_rel_diff(state.trainable, plain) > 1e-3   # the momentum changed the trajectory


def test_fwdllm_and_fedkseed_read_their_own_sections_and_their_former_zo_keys():
  cfg = config_lib.parse(tz.config('fwdllm', fwdllm={'min_probes': 3}, fedkseed={'candidates': 64}))
  assert (cfg.fwdllm.min_probes, cfg.fedkseed.candidates) == (3, 64)
  assert not hasattr(cfg.zo, 'fwdllm_min_probes')
  with pytest.raises(ConfigError, match=r'unknown config field fwdllm\.candidats; did you mean '
                                        r'fwdllm\.candidates\?'):
    config_lib.parse(tz.config('fwdllm', fwdllm={'candidats': 2}))
  # A finished run's config.json names them zo.*: it parses as the same run.
  old = {'algorithm': 'fwdllm', 'zo': {'probes': 4, 'kseed_candidates': 64,
                                       'fwdllm_min_probes': 3, 'fwdllm_candidates': 4,
                                       'fwdllm_var_threshold': 0.5}}
  new = {'algorithm': 'fwdllm', 'zo': {'probes': 4}, 'fedkseed': {'candidates': 64},
         'fwdllm': {'min_probes': 3}}
  assert config_lib.parse(old) == config_lib.parse(new)
  with pytest.raises(ConfigError, match=r'zo\.fwdllm_min_probes=2 and fwdllm\.min_probes=3 '
                                        r'disagree'):
    config_lib.parse({'zo': {'fwdllm_min_probes': 2}, 'fwdllm': {'min_probes': 3}})
  committed = pathlib.Path(REPO) / 'experiments/results/reproduce_bbc_minilm/fwdllm/config.json'
  assert config_lib.parse(json.loads(committed.read_text())).fwdllm.min_probes == 2


def test_the_docs_show_the_example_as_it_is():
  doc = (pathlib.Path(REPO) / 'docs/algorithms.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', doc, re.S)
  assert (pathlib.Path(REPO) / 'examples/server_momentum.py').read_text() in blocks


@pytest.mark.slow
def test_the_cli_trains_a_users_algorithm_with_its_own_field_and_replays_it(tmp_path):
  """examples/server_momentum.py through experiments.train (its section overridden on the command
  line), then experiments.replay: bit for bit to every checkpoint."""
  wd = tmp_path / 'wd'
  proc = _train(wd, f'--config=experiments/configs/demo.py:{MODULE}:fedmezo_momentum',
                '--config.fedmezo_momentum.momentum=0.5', f'--config.dataset={_csv(tmp_path)}',
                '--config.num_clients=4', '--config.clients_per_round=3',
                '--config.local_steps=2', '--config.batch_size=4', '--config.max_length=16',
                '--config.min_client_size=2', '--config.partition=iid', '--config.rounds=4',
                '--config.eval_every=2', '--config.checkpoint_every=2', '--progress=false')
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((wd / 'config.json').read_text())
  assert saved['algorithm_module'] == MODULE and saved['fedmezo_momentum'] == {'momentum': 0.5}
  replay = subprocess.run([sys.executable, '-m', 'experiments.replay', f'--workdir={wd}'],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert replay.returncode == 0, replay.stderr[-3000:]
  assert 'replay: fedmezo_momentum, 4 ledger rounds' in replay.stdout
  assert 'equal bit for bit to checkpoints 2, 4' in replay.stdout


def test_a_checkpoint_of_an_untyped_state_is_refused_in_one_line(tmp_path):
  """What versions before typed states saved: the algorithm state as a dict, no layout record."""
  from cooperllm_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  alg = make_algorithm(tz.config('fedmezo'), tz.MODEL)
  state = alg.init(jax.tree.map(jnp.asarray, tz.PARAMS_NP))
  ck = checkpoint_lib.Checkpointer(tmp_path / 'ck', log=lambda _: None)
  ck.save(1, {'state': {'trainable': state.trainable, 'lr': state.lr}}, {})
  meta = tmp_path / 'ck' / '1' / 'meta' / 'metadata'
  meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                              if k != 'layout_sha256'}))
  with pytest.raises(CheckpointError, match='untyped dict states') as e:
    ck.restore(checkpoint_lib.template(state, False))
  ck.close()
  assert '\n' not in str(e.value)

"""experiments.benchmark: the rate is picked on validation only, ablations and warm_start take the
pick they depend on, the report's intervals and times to target are right, and the quick mode runs
end to end and resumes instead of redoing finished runs."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cooperllm_jax.errors import ConfigError
from experiments import benchmark
from experiments import benchmark_settings

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_interval_matches_student_t():
  mean, half = benchmark.interval([0.70, 0.72, 0.74])
  assert mean == pytest.approx(0.72)
  # t(0.975, 2) = 4.3027; sd = 0.02; half-width = 4.3027 * 0.02 / sqrt(3).
  assert half == pytest.approx(4.3027 * 0.02 / np.sqrt(3), rel=1e-4)
  assert benchmark.interval([0.5]) == (0.5, 0.0)


def _fake_runs(monkeypatch, val_of):
  """run_one writes nothing but records its calls; final_validation answers val_of(path)."""
  calls = []
  monkeypatch.setattr(benchmark, 'run_one', lambda path, algorithm, overrides:
                      calls.append((path, algorithm, overrides)))
  monkeypatch.setattr(benchmark, 'final_validation', val_of)
  return calls


def _lr(path):
  return float(path.parent.name.split('=')[1])


def test_sweep_picks_on_validation_and_feeds_dependants(tmp_path, monkeypatch):
  # Validation peaks at lr 1e-2 for ZO methods, 3e-4 for cloud_only and lr_V 0.1 for cooperllm.
  def peak(path):
    value = _lr(path)
    best = (3e-4 if 'cloud_lr=' in str(path) or 'cloud_only' in str(path) else
            0.1 if 'lr_v=' in str(path) else 1e-2)
    return -abs(np.log10(value) - np.log10(best))
  calls = _fake_runs(monkeypatch, peak)
  plan = benchmark_settings.Plan.of('bbc_minilm_lora',
                                    methods=('cooperllm_adaptive', 'cooperllm', 'fedmezo'))
  record = benchmark.sweep(plan, tmp_path)
  assert record['fedmezo']['picked'] == 1e-2 and not record['fedmezo']['at_grid_edge']
  assert record['cooperllm']['picked'] == 0.1 and record['cooperllm']['knob'] == 'zgr.lr_v'
  assert record['cooperllm_adaptive']['picked'] == 0.1
  assert record['cooperllm_adaptive']['rate_of'] is None     # its own lr_V sweep
  # Dependencies first: fedmezo's rate feeds both cooperllm sweeps (in the order asked for).
  assert [c[0].parts[-3] for c in calls] == ['fedmezo'] * 5 + ['cooperllm_adaptive'] * 5 + [
      'cooperllm'] * 5
  assert all('learning_rate=0.01' in c[2] for c in calls[5:])
  # cooperllm's lr_V is the line search's largest rate, on its own grid.
  assert [c[0].parts[-2] for c in calls[10:15]] == [f'lr_v={v:g}' for v in
                                                    benchmark_settings.GRIDS['lr_v_max']]
  assert [c[0].parts[-2] for c in calls[5:10]] == [f'lr_v={v:g}' for v in
                                                   benchmark_settings.GRIDS['lr_v']]
  assert all('zgr.line_search=0' in c[2] for c in calls[5:10])        # adaptive: before it
  assert not any('zgr.line_search' in o for c in calls[10:15] for o in c[2])   # the default
  assert all('zgr.adaptive=True' in c[2] for c in calls[5:10])

  calls.clear()
  plan = benchmark_settings.Plan.of('rt_shifted_minilm_lora', methods=('warm_start', 'fedmezo'))
  record = benchmark.sweep(plan, tmp_path / 'rt')
  assert [c[0].parts[-3] for c in calls] == ['fedmezo'] * 5 + ['warm_start'] * 5
  assert [c[0].parts[-2] for c in calls[5:]] == [f'cloud_lr={v:g}' for v in
                                                 benchmark_settings.GRIDS['bp']]
  assert record['warm_start']['picked'] == 3e-4          # 'cloud_only' is not in its path
  assert all('learning_rate=0.01' in c[2] and 'warm.rounds=20' in c[2] for c in calls[5:])
  assert not any('warm.cloud_rounds' in o for c in calls for o in c[2])   # half the cloud's steps
  # warm_start_zo_swept the other way round: cloud_only's final model (its AdamW rate, all its
  # rounds' steps in the cloud phase), its ZO phase's rate swept on the grid for a trained model.
  calls.clear()
  plan = benchmark_settings.Plan.of('rt_shifted_minilm_lora',
                                    methods=('warm_start_zo_swept', 'cloud_only'))
  record = benchmark.sweep(plan, tmp_path / 'rt_zo')
  assert [c[0].parts[-3] for c in calls] == ['cloud_only'] * 5 + ['warm_start_zo_swept'] * 5
  assert [c[0].parts[-2] for c in calls[5:]] == [
      f'lr={v:g}' for v in benchmark_settings.GRIDS['zo_after_cloud']]
  assert all('cloud.learning_rate=0.0003' in c[2] and 'warm.rounds=20' in c[2]
             and 'warm.cloud_rounds=40' in c[2] and c[1] == 'warm_start' for c in calls[5:])
  assert not any('warm.cloud_rounds' in o for c in calls[:5] for o in c[2])
  assert record['warm_start_zo_swept']['picked'] == 1e-2    # the peak (1e-2): the grid's edge
  assert record['warm_start_zo_swept']['at_grid_edge']
  # sweep.json keeps what an earlier call swept.
  benchmark.sweep(benchmark_settings.Plan.of('rt_shifted_minilm_lora', methods=('cloud_only',)),
                  tmp_path / 'rt')
  assert set(json.loads((tmp_path / 'rt' / 'sweep.json').read_text())) == {
      'cloud_only', 'warm_start', 'fedmezo'}


def test_sweeps_side_by_side_keep_each_others_picks(tmp_path, monkeypatch):
  """Two processes sweeping different methods of one setting: each writes its pick into sweep.json
  as the file is when it finishes (the later one once dropped the earlier one's pick)."""
  other = {'knob': 'learning_rate', 'val_accuracy': {'0.0003': 0.7}, 'picked': 3e-4,
           'rate_of': None, 'at_grid_edge': False}

  def val(path):   # the other process finishes cloud_only during this one's fedmezo sweep
    if _lr(path) == 1e-3:
      (tmp_path / 'sweep.json').write_text(json.dumps({'cloud_only': other}))
    return _lr(path)
  _fake_runs(monkeypatch, val)
  benchmark.sweep(benchmark_settings.Plan.of('rt_shifted_minilm_lora', methods=('fedmezo',)),
                  tmp_path)
  record = json.loads((tmp_path / 'sweep.json').read_text())
  assert record['cloud_only'] == other and record['fedmezo']['picked'] == 1e-1
  assert [p.name for p in tmp_path.iterdir()] == ['sweep.json']   # no temp file left behind


def test_sweep_edge_ties_and_missing_dependency(tmp_path, monkeypatch):
  _fake_runs(monkeypatch, lambda path: 0.9 if _lr(path) >= 3e-3 else 0.5)
  plan = benchmark_settings.Plan.of('bbc_minilm_lora', methods=('fedmezo',))
  record = benchmark.sweep(plan, tmp_path)
  assert record['fedmezo']['picked'] == 3e-3          # the tie goes to the smaller rate
  _fake_runs(monkeypatch, lambda path: _lr(path))
  record = benchmark.sweep(plan, tmp_path)
  assert record['fedmezo']['picked'] == 1e-1 and record['fedmezo']['at_grid_edge']
  with pytest.raises(ConfigError, match='sweep cooperllm first'):
    benchmark.sweep(benchmark_settings.Plan.of('bbc_minilm_lora', methods=('cooperllm_shuffled',)),
                    tmp_path)
  with pytest.raises(ConfigError, match='sweep fedmezo first'):
    benchmark.sweep(benchmark_settings.Plan.of('rt_shifted_minilm_lora', methods=('warm_start',)),
                    tmp_path / 'other')
  # A pick made under another knob (an older sweep.json) is not taken.
  (tmp_path / 'sweep.json').write_text(json.dumps({
      'fedmezo': {'picked': 1e-3}, 'cooperllm': {'picked': 1e-3, 'knob': 'learning_rate'}}))
  with pytest.raises(ConfigError, match='sweep cooperllm first'):
    benchmark.sweep(benchmark_settings.Plan.of('bbc_minilm_lora', methods=('cooperllm_shuffled',)),
                    tmp_path)
  # Seeds and the report of a method never swept name it (the report once raised a KeyError).
  plan = benchmark_settings.Plan.of('bbc_minilm_lora', methods=('cooperllm', 'fedkseed'))
  for stage in (benchmark.seeds, benchmark.report):
    with pytest.raises(ConfigError, match='fedkseed has no pick in sweep.json'):
      stage(plan, tmp_path, {'cooperllm': {'picked': 0.1, 'knob': 'zgr.lr_v'}})


def _write_run(path, finals, forwards=10):
  """A finished run: test accuracy `finals[r - 1]` after round r."""
  path.mkdir(parents=True)
  rows = [{'round': 0, 'test_accuracy': 0.5, 'sim_time_s': 0.0}]
  rows += [{'round': r, 'test_accuracy': a, 'val_accuracy': a, 'sim_time_s': 2.0 * r,
            'forwards': forwards, 'bytes_up_per_client': 8.0, 'bytes_down_per_client': 100.0,
            'train_loss': 0.6} for r, a in enumerate(finals, 1)]
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (path / 'summary.json').write_text(json.dumps({
      'accuracy_before': 0.5, 'accuracy_after': finals[-1], 'val_accuracy_after': finals[-1],
      'train_seconds': 1.0}))


def test_paired_methods_run_more_seeds_and_report_their_paired_difference(tmp_path):
  full = benchmark_settings.Plan.of('bbc_minilm_lora')
  assert full.seeds_of('cooperllm_shuffled_adaptive') == tuple(range(7)) == full.seeds_of('fedmezo')
  assert full.seeds_of('cooperllm') == benchmark_settings.SEEDS
  assert benchmark_settings.Plan.of('bbc_minilm_lora', quick=True).seeds_of('fedmezo') == (0, 1)
  plan = benchmark_settings.Plan.of('bbc_minilm_lora', methods=(
      'fedmezo', 'cooperllm_shuffled_adaptive', 'cooperllm'))
  finals = {'fedmezo': [0.40, 0.50, 0.45, 0.42, 0.48, 0.44, 0.46],
            'cooperllm_shuffled_adaptive': [0.41, 0.47, 0.45, 0.43, 0.46, 0.45, 0.44],
            'cooperllm': [0.8, 0.82, 0.84]}
  for method, per_seed in finals.items():
    for seed, final in zip(plan.seeds_of(method), per_seed):
      _write_run(benchmark.run_dir(tmp_path, method, 1e-3, seed), [final])
  record = {m: {'picked': 1e-3, 'at_grid_edge': False, 'knob': benchmark_settings.METHODS[m].knob}
            for m in finals}
  table = benchmark.report(plan, tmp_path, record)
  out = json.loads((tmp_path / 'table.json').read_text())
  rows = {r['method']: r for r in out['rows']}
  assert rows['fedmezo']['seeds'] == 7 and rows['cooperllm']['seeds'] == 3
  assert rows['fedmezo']['accuracy'] == pytest.approx(np.mean(finals['fedmezo']))
  (pair,) = out['paired']          # the control without a run (cooperllm_shuffled) is left out
  diffs = np.subtract(finals['cooperllm_shuffled_adaptive'], finals['fedmezo'])
  # The paired interval is the t-interval of the per-seed differences, not of the two means.
  assert pair['seeds'] == list(range(7)) and pair['per_seed'] == pytest.approx(diffs)
  assert pair['difference'] == pytest.approx(diffs.mean())
  assert pair['ci95'] == pytest.approx(2.4469 * diffs.std(ddof=1) / np.sqrt(7), rel=1e-4)
  assert 'cooperllm_shuffled_adaptive − fedmezo: -0.0057 ±' in table
  assert '(the paired methods below: 0-6)' in table


def test_report_intervals_and_time_to_target(tmp_path):
  plan = benchmark_settings.Plan.of('bbc_minilm_lora', methods=('cooperllm', 'fedmezo'), quick=True)
  curves = {'cooperllm': [[0.7, 0.8], [0.75, 0.82], [0.6, 0.84]],
            'fedmezo': [[0.6, 0.70], [0.6, 0.72], [0.6, 0.74]]}
  for method, per_seed in curves.items():
    for seed, finals in zip(plan.seeds, per_seed):
      _write_run(benchmark.run_dir(tmp_path, method, 1e-3, seed), finals)
  record = {m: {'picked': 1e-3, 'at_grid_edge': m == 'fedmezo',
                'knob': benchmark_settings.METHODS[m].knob} for m in curves}
  for method, per_seed in curves.items():     # cooperllm's runs live under its knob, lr_v
    for seed in plan.seeds:
      assert (benchmark.run_dir(tmp_path, method, 1e-3, seed) / 'summary.json').exists()
  table = benchmark.report(plan, tmp_path, record)
  rows = {r['method']: r for r in json.loads((tmp_path / 'table.json').read_text())['rows']}
  n = len(plan.seeds)
  expected = benchmark.interval([c[-1] for c in curves['fedmezo'][:n]])
  assert rows['fedmezo']['accuracy'] == pytest.approx(expected[0])
  assert rows['fedmezo']['accuracy_ci95'] == pytest.approx(expected[1])
  target = json.loads((tmp_path / 'table.json').read_text())['target']
  assert target == pytest.approx(expected[0])          # the only baseline sets the target
  # cooperllm: seeds 0 and 1 pass the target at round 1, seed 2 at round 2.
  hits = [1 if c[0] >= target else 2 for c in curves['cooperllm'][:n]]
  assert rows['cooperllm']['rounds_to_target'] == pytest.approx(np.mean(hits))
  assert rows['cooperllm']['forwards_to_target'] == pytest.approx(10 * np.mean(hits))
  assert rows['cooperllm']['sim_s_to_target'] == pytest.approx(2.0 * np.mean(hits))
  assert '| fedmezo | lr=0.001* |' in table                # the edge pick is flagged
  assert '| cooperllm | lr_v=0.001 (learning_rate=0.001 from fedmezo) |' in table
  assert (tmp_path / 'accuracy.png').exists() and (tmp_path / 'accuracy_vs_time.png').exists()


def test_a_diverged_run_ranks_last_is_recorded_and_not_rerun(tmp_path, monkeypatch):
  """The guard giving up on one rate is a result of the sweep (that rate is too large), not a
  crash of the sweep; the marker sits beside the run directory and stops a rerun."""
  from cooperllm_jax.errors import TrainingError  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_train(config, path, **kw):
    calls.append(config.learning_rate)
    if config.learning_rate > 0.02:
      raise TrainingError('training loss spiked; lower learning_rate')
    path.mkdir(parents=True, exist_ok=True)
    (path / 'config.json').write_text(config.to_json())
    _write_run(path / 'x', [config.learning_rate * 10])   # metrics of a finished run
    for name in ('metrics.jsonl', 'summary.json'):
      (path / 'x' / name).rename(path / name)
    return json.loads((path / 'summary.json').read_text())

  monkeypatch.setattr(run_lib, 'train_and_evaluate', fake_train)
  plan = benchmark_settings.Plan.of('bbc_minilm_lora', methods=('fedmezo',))
  record = benchmark.sweep(plan, tmp_path)
  assert record['fedmezo']['val_accuracy'] == {'0.001': 0.01, '0.003': 0.03, '0.01': 0.1,
                                               '0.03': None, '0.1': None}
  assert record['fedmezo']['picked'] == 1e-2
  marker = benchmark.diverged_marker(benchmark.run_dir(tmp_path, 'fedmezo', 3e-2, 0))
  assert 'spiked' in json.loads(marker.read_text())['error']
  assert not (marker.parent / 'seed=0' / 'diverged.json').exists()
  calls.clear()
  benchmark.sweep(plan, tmp_path)
  assert calls == []                                     # nothing reran, diverged or finished


def test_report_refuses_unfinished_runs(tmp_path):
  plan = benchmark_settings.Plan.of('bbc_minilm_lora', methods=('fedmezo',), quick=True)
  with pytest.raises(ConfigError, match='has not finished'):
    benchmark.report(plan, tmp_path, {'fedmezo': {'picked': 1e-3, 'at_grid_edge': False}})


def test_quick_mode_end_to_end_and_resume(tmp_path):
  """`make reproduce-quick`'s command: every stage on the real model and data; a second call reads
  every finished run back instead of rerunning it."""
  make = (REPO / 'Makefile').read_text()
  recipe = make[make.index('\nreproduce-quick:'):].split('\n')[2]
  assert '-m experiments.benchmark ' in recipe and recipe.endswith(
      '--quick --settings=rt_shifted_minilm_lora'), recipe      # what this test runs
  cmd = [sys.executable, '-m', 'experiments.benchmark', f'--workdir={tmp_path}', '--quick',
         '--settings=rt_shifted_minilm_lora', f'--compilation_cache={tmp_path / "cache"}']
  env = dict(os.environ, PYTHONPATH=str(REPO))
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert first.returncode == 0, first.stderr[-3000:]
  root = tmp_path / 'rt_shifted_minilm_lora'
  table = json.loads((root / 'table.json').read_text())
  assert [r['method'] for r in table['rows']] == list(benchmark_settings.QUICK['methods'])
  for r in table['rows']:
    assert len(r['accuracy_per_seed']) == len(benchmark_settings.QUICK['seeds'])
    assert 0.0 <= r['accuracy'] <= 1.0 and r['accuracy_ci95'] >= 0.0
  assert table['target_by'] != 'cooperllm'
  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'running ' not in second.stdout and 'resuming ' not in second.stdout
  assert json.loads((root / 'table.json').read_text())['rows'] == table['rows']


def test_bad_flags_are_one_line(tmp_path):
  for flag, needle in (('--settings=nope', 'unknown settings'), ('--methods=nope', 'unknown methods')):
    out = subprocess.run([sys.executable, '-m', 'experiments.benchmark', f'--workdir={tmp_path}',
                          flag, '--stage=report'], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_every_setting_and_method_is_a_valid_config():
  """A typo in a setting's overrides fails here, not hours into a sweep."""
  from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from experiments.variants import apply_override  # pylint: disable=g-import-not-at-top
  for quick in (False, True):
    for name in benchmark_settings.SETTINGS:
      plan = benchmark_settings.Plan.of(name, quick=quick)
      for method in plan.methods:
        algorithm, overrides = plan.variant(method, 1e-3, 0, {'cloud_only': 1e-3,
                                                               'fedmezo': 1e-3,
                                                               'cooperllm': 1.0})
        config = demo.get_config(algorithm)
        for o in overrides:
          apply_override(config, o)
        cfg = config_lib.parse(config)
        assert cfg.rounds == plan.rounds and cfg.data.validation_fraction > 0


def test_a_setting_replaces_only_the_grids_it_names():
  """bbc_minilm_full replaces the ZO grid and runs cooperllm at its default lr_V only; the other
  lr_V grids stay GRIDS' (it once raised)."""
  from experiments.benchmark_settings import GRIDS, Plan  # pylint: disable=g-import-not-at-top
  plan = Plan.of('bbc_minilm_full')
  assert plan.grid('fedmezo') == (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
  assert plan.grid('cooperllm') == (0.1,)      # the default only
  assert plan.grid('cooperllm_fixed_rate') == GRIDS['lr_v']
  assert Plan.of('bbc_minilm_lora').grid('cooperllm') == GRIDS['lr_v_max']

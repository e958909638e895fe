r"""The benchmark: CooperLLM against every baseline that also uses the public data, tuned the same
way, three seeds, on settings where the private data differs from the public data.

  python -m experiments.benchmark --workdir=experiments/results/benchmark            # everything
  python -m experiments.benchmark --workdir=... --settings=rt_shifted_minilm_lora --stage=sweep
  python -m experiments.benchmark --workdir=workdir/benchmark_quick --quick          # minutes

Stages, in order (--stage=all runs the three):
  sweep   every method of a setting at each value of its knob's grid (5 log-spaced values), seed
          0: the learning rate, but for cooperllm, whose plain part runs at FedMeZO's picked rate
          and whose own rate lr_V (the step along the cloud's subspace) is swept. The value is
          picked by the final accuracy on a validation split held out of the clients' data
          (data.validation_fraction); the test split is never looked at. A pick at the edge of
          the grid is flagged in the table (the grid should be widened there).
  seeds   the picked values at seeds 0, 1, 2 (seed 0 is the sweep's run; a setting's paired
          methods at its paired seeds).
  report  workdir/<setting>/table.md|json: final test accuracy as mean and 95% t-interval over the
          seeds; rounds, client forward passes and simulated seconds to the target (the best final
          mean accuracy among the baselines, cloud_only and warm_start included); bytes per
          client and round; accuracy.png / accuracy_vs_time.png (seed means).

Every run lives in workdir/<setting>/runs/<method>/<knob>=<value>/seed=<seed>/. A finished run
whose config matches is read back, not rerun; an interrupted one resumes from its newest
checkpoint, so the sweep spans sessions. A method that takes another's pick (cooperllm and
warm_start: FedMeZO's rate for their ZO part, while cooperllm sweeps lr_V and warm_start the AdamW
rate of its cloud phase, the first half of the rounds; warm_start_zo_swept the other way round:
cloud_only's final model (its AdamW rate and all its steps in the cloud phase), its ZO phase's
rate swept; the ZGR ablations:
cooperllm's picks) is swept after it. --quick shrinks every setting (rounds, clients,
grid, seeds) to check the pipeline.
"""

import json
import math
import pathlib
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from cooperllm_jax.errors import ConfigError, CooperError, TrainingError
from cooperllm_jax.io import write_text_atomic
from experiments.benchmark_settings import METHODS, QUICK, SETTINGS, Plan

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the runs and tables.', required=True)
_SETTINGS = flags.DEFINE_list('settings', list(SETTINGS), 'Settings to run.')
_METHODS = flags.DEFINE_list('methods', [], "Methods to run (default: the setting's).")
_STAGE = flags.DEFINE_enum('stage', 'all', ['all', 'sweep', 'seeds', 'report'], 'Stages to run.')
_QUICK = flags.DEFINE_bool('quick', False, 'Shrink every setting: check the pipeline in minutes.')
_CACHE = flags.DEFINE_string('compilation_cache', 'workdir/jax_cache',
                             "JAX's persistent compilation cache (the runs share most programs); "
                             "'' = off.")


def knob_name(method: str) -> str:
  """The short name of a method's swept knob: lr, lr_v, cloud_lr."""
  knob = METHODS[method].knob
  return {'learning_rate': 'lr', 'cloud.learning_rate': 'cloud_lr'}.get(knob,
                                                                     knob.rsplit('.', 1)[-1])


def run_dir(root: pathlib.Path, method: str, value: float, seed: int) -> pathlib.Path:
  return root / 'runs' / method / f'{knob_name(method)}={value:g}' / f'seed={seed}'


def diverged_marker(path: pathlib.Path) -> pathlib.Path:
  """Where a run that the divergence guard gave up on is recorded (beside its directory: the run
  directory holds only what a run writes)."""
  return path.parent / f'{path.name}.diverged.json'


def run_one(path: pathlib.Path, algorithm: str, overrides: tuple) -> Optional[dict]:
  """The summary of one run in `path`: read back when finished with this config, resumed when
  interrupted after a checkpoint, else (re)started. None: the run diverged (the guard gave up
  after its rollbacks), now or before with this config."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from experiments.variants import apply_override  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.run import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = demo.get_config(algorithm)
  for o in overrides:
    apply_override(config, o)
  def same_as(read):   # the parsed configs agree (a field added since takes its default)
    try:
      return config_lib.parse(ml_collections.ConfigDict(read())) == config_lib.parse(config)
    except (OSError, ValueError, KeyError, CooperError):
      return False
  saved_json = lambda: json.loads((path / 'config.json').read_text())
  same, marker = same_as(saved_json), diverged_marker(path)
  if same and (path / 'summary.json').exists():
    return json.loads((path / 'summary.json').read_text())
  if same_as(lambda: json.loads(json.loads(marker.read_text())['config'])):
    return None
  saved = ml_collections.ConfigDict(saved_json()) if same else None
  checkpoints = path / 'checkpoints'
  resume = same and checkpoints.is_dir() and any(checkpoints.iterdir())
  print(f'{"resuming" if resume else "running"} {path}', flush=True)
  marker.unlink(missing_ok=True)
  try:
    return train_and_evaluate(config if not resume else saved, path,
                              overwrite=not resume and path.exists(), resume=resume,
                              log=lambda msg: None)
  except TrainingError as e:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({'error': str(e), 'config': config.to_json()}))
    print(f'diverged: {path}: {e}', flush=True)
    return None


def metrics_of(path: pathlib.Path) -> list[dict]:
  from cooperllm_jax.reporting import read_metrics  # pylint: disable=g-import-not-at-top
  return read_metrics(path / 'metrics.jsonl')


def final_validation(path: pathlib.Path) -> Optional[float]:
  """The last evaluated row's validation accuracy (what the sweep picks by); None for a run that
  diverged."""
  if diverged_marker(path).exists():
    return None
  rows = [m for m in metrics_of(path) if m.get('val_accuracy') is not None]
  if not rows:
    raise ConfigError(f'{path}: no validation accuracy logged (validation_fraction = 0?)')
  return rows[-1]['val_accuracy']


def sweep(plan: Plan, root: pathlib.Path) -> dict:
  """Runs each method's grid at the first seed and picks its value; sweep.json (each value's final
  validation accuracy and the pick) keeps the methods swept before (--methods runs a few)."""
  record = _swept(root)
  pending = list(plan.methods)
  picked = picks(record)   # earlier picks count unless this call sweeps the method again
  done = lambda: set(picked) - set(pending)
  while pending:   # a method runs once the methods whose picks it takes are picked
    ready = [m for m in pending if METHODS[m].depends_on() <= done()]
    if not ready:
      method = pending[0]
      missing = sorted(METHODS[method].depends_on() - done())
      raise ConfigError(f'{plan.name}: {method} runs at the picks of {", ".join(missing)}: '
                        f'sweep {missing[0]} first (add it to --methods)')
    method = ready[0]
    source, grid = METHODS[method].rate_of, plan.grid(method)
    scores = {}
    for value in (picked[source],) if source else grid:
      path = run_dir(root, method, value, plan.seeds[0])
      run_one(path, *plan.variant(method, value, plan.seeds[0], picked))
      scores[value] = final_validation(path)
    # A diverged value ranks last; ties go to the smaller value.
    best = max(scores, key=lambda v: (-1.0 if scores[v] is None else scores[v], -v))
    picked[method] = best
    pending.remove(method)
    record[method] = {'knob': METHODS[method].knob,
                      'val_accuracy': {f'{v:g}': a for v, a in scores.items()},  # None: diverged
                      'picked': best, 'rate_of': source,
                      'at_grid_edge': (record[source]['at_grid_edge'] if source
                                       else best in (grid[0], grid[-1]))}
    print(f'{plan.name}: {method} picks {METHODS[method].knob}={best:g} (validation '
          f'{scores[best]:.4f})', flush=True)
    # Another process may have swept other methods of this setting meanwhile (side by side):
    # this method's entry goes into the file as it is now, not as it was when this call began.
    record = {**_swept(root), method: record[method]}
    write_text_atomic(root / 'sweep.json', json.dumps(record, indent=1))
  return record


def _swept(root: pathlib.Path) -> dict:
  """sweep.json's record; {} before the first method's sweep."""
  return read_sweep(root) if (root / 'sweep.json').exists() else {}


def read_sweep(root: pathlib.Path) -> dict:
  try:
    return json.loads((root / 'sweep.json').read_text())
  except (OSError, ValueError):
    raise ConfigError(f'{root / "sweep.json"}: no finished sweep (run --stage=sweep first)') \
        from None


def picks(record: dict) -> dict:
  """{method: picked value} of the sweep.json entries made with the method's current knob."""
  return {m: r['picked'] for m, r in record.items()
          if m in METHODS and r.get('knob', 'learning_rate') == METHODS[m].knob}


def _picked(plan: Plan, record: dict) -> dict:
  """picks(record) of every method of the plan (a one-line error names one without)."""
  picked = picks(record)
  for method in plan.methods:
    if method not in picked:
      raise ConfigError(f'{plan.name}: {method} has no pick in sweep.json: sweep it first '
                        '(or leave it out of --methods)')
  return picked


def seeds(plan: Plan, root: pathlib.Path, record: dict) -> None:
  picked = _picked(plan, record)
  for method in plan.methods:
    for seed in plan.seeds_of(method):
      run_one(run_dir(root, method, picked[method], seed),
              *plan.variant(method, picked[method], seed, picked))


def interval(values) -> tuple[float, float]:
  """Mean and the half-width of its two-sided 95% Student-t interval (0 for one value)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), 0.0
  return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _tuned(method: str, record: dict) -> str:
  """'lr=0.001', or 'lr_v=1 (learning_rate=0.001 from fedmezo)' for a method that takes picks."""
  taken = ', '.join(f'{key}={record[source]["picked"]:g} from {source}'
                    for key, source in METHODS[method].needs if source in record)
  return f'{knob_name(method)}={record[method]["picked"]:g}' + (f' ({taken})' if taken else '')


def _to_target(rows: list[dict], target: float) -> Optional[dict]:
  return next((m for m in rows if m.get('test_accuracy', -1.0) >= target - 1e-9), None)


def report(plan: Plan, root: pathlib.Path, record: dict) -> str:
  """table.md / table.json / plots of the seeds' runs at the picked rates."""
  from cooperllm_jax.reporting import plot_accuracy  # pylint: disable=g-import-not-at-top
  runs, diverged, final_by_seed = {}, {}, {}
  picked = _picked(plan, record)
  for method in plan.methods:
    value = picked[method]
    seeds = plan.seeds_of(method)
    paths = [run_dir(root, method, value, s) for s in seeds]
    missing = [p for p in paths
               if not (p / 'summary.json').exists() and not diverged_marker(p).exists()]
    if missing:
      raise ConfigError(f'{plan.name}: {missing[0]} has not finished: run --stage=seeds first')
    done = [(s, p) for s, p in zip(seeds, paths) if (p / 'summary.json').exists()]
    finished_seeds, finished = [s for s, _ in done], [p for _, p in done]
    diverged[method] = len(paths) - len(finished)   # reported beside the finished seeds' figures
    if finished:
      runs[method] = (value, [json.loads((p / 'summary.json').read_text()) for p in finished],
                      [metrics_of(p) for p in finished])
      final_by_seed[method] = {s: summary['accuracy_after']
                               for s, summary in zip(finished_seeds, runs[method][1])}
  finals = {m: interval([s['accuracy_after'] for s in summaries])
            for m, (_, summaries, _) in runs.items()}
  baselines = [m for m in runs if not METHODS[m].ours]
  target_by = max(baselines, key=lambda m: finals[m][0]) if baselines else None
  target = finals[target_by][0] if target_by else None
  rows = []
  for method, (_, summaries, metrics) in runs.items():
    hits = [_to_target(ms, target) if target is not None else None for ms in metrics]
    trained = [[m for m in ms if m['round'] > 0] for ms in metrics]
    forwards = [np.cumsum([m['forwards'] for m in t]) for t in trained]
    reached = [h for h in hits if h is not None]
    rows.append(dict(
        method=method, tuned=_tuned(method, record), at_grid_edge=record[method]['at_grid_edge'],
        seeds=len(summaries), diverged=diverged[method], accuracy_before=float(np.mean([s['accuracy_before']
                                                              for s in summaries])),
        accuracy=finals[method][0], accuracy_ci95=finals[method][1],
        accuracy_per_seed=[s['accuracy_after'] for s in summaries],
        val_accuracy=float(np.mean([s['val_accuracy_after'] for s in summaries])),
        reached=f'{len(reached)}/{len(hits)}',
        rounds_to_target=(float(np.mean([h['round'] for h in reached]))
                          if len(reached) == len(hits) and hits else None),
        forwards_to_target=(float(np.mean([f[h['round'] - 1] for f, h in zip(forwards, hits)]))
                            if len(reached) == len(hits) and hits else None),
        sim_s_to_target=(float(np.mean([h['sim_time_s'] for h in reached]))
                         if len(reached) == len(hits) and hits else None),
        bytes_up_per_client=float(np.mean([m['bytes_up_per_client'] for t in trained for m in t])),
        bytes_down_per_client=float(np.mean([m['bytes_down_per_client']
                                             for t in trained for m in t])),
        train_seconds=float(np.mean([s['train_seconds'] for s in summaries]))))
  paired = _paired(plan, final_by_seed)
  lines = [f'# {plan.name}', '', plan.setting.about + '.', '',
           f'{plan.rounds} rounds; the tuned values picked on the validation split (seed '
           f'{plan.seeds[0]}); test accuracy over seeds {", ".join(map(str, plan.seeds))}'
           + (f' (the paired methods below: {_span(plan.paired_seeds)})' if paired else '')
           + ': mean '
           '± half-width of the 95% t-interval. Target: '
           + (f'{target:.4f} ({target_by}\'s mean final accuracy, the best baseline); rounds, '
              'client forwards and simulated seconds to it are seed means, shown only when every '
              'seed reaches it (reached: seeds that did).' if target_by else 'none.')
           + ' *: the pick is at the edge of its grid. Seeds that diverged (the guard gave up) are '
           'counted, not averaged; a method with none finished has no row.', '',
           '| method | tuned | test accuracy | validation | diverged | reached | rounds to target | '
           'client forwards to target | sim s to target | up B/client/round | '
           'down B/client/round | train s (CPU) |', '| --- ' * 12 + '|']
  fmt = lambda v, f: '—' if v is None else f.format(v)
  for r in rows:
    lines.append(f'| {r["method"]} | {r["tuned"]}{"*" if r["at_grid_edge"] else ""} | '
                 f'{r["accuracy"]:.4f} ± {r["accuracy_ci95"]:.4f} | {r["val_accuracy"]:.4f} | '
                 f'{r["diverged"]} | {r["reached"]} | {fmt(r["rounds_to_target"], "{:.1f}")} | '
                 f'{fmt(r["forwards_to_target"], "{:,.0f}")} | '
                 f'{fmt(r["sim_s_to_target"], "{:,.1f}")} | {r["bytes_up_per_client"]:,.0f} | '
                 f'{r["bytes_down_per_client"]:,.0f} | {r["train_seconds"]:.0f} |')
  if paired:
    lines += ['', 'Paired by seed (test accuracy of the method minus its control on the same '
              'seeds; mean ± half-width of the 95% t-interval):', '']
    lines += [f'- {p["method"]} − {p["control"]}: {p["difference"]:+.4f} ± {p["ci95"]:.4f} over '
              f'{len(p["seeds"])} seeds (per seed '
              + ' / '.join(f'{d:+.3f}' for d in p['per_seed']) + ')' for p in paired]
  table = '\n'.join(lines) + '\n'
  (root / 'table.md').write_text(table, encoding='utf-8')
  (root / 'table.json').write_text(json.dumps(
      {'setting': plan.name, 'about': plan.setting.about, 'overrides': plan.overrides,
       'target': target, 'target_by': target_by, 'rows': rows, 'paired': paired}, indent=1))
  curves = {m: _mean_curve(metrics) for m, (_, _, metrics) in runs.items()}
  for x, name in (('round', 'accuracy.png'), ('sim_time_s', 'accuracy_vs_time.png')):
    plot_accuracy(curves, root / name, f'{plan.name}: test accuracy (mean over seeds)', x=x,
                  target=target)
  return table


def _paired(plan: Plan, final_by_seed: dict) -> list[dict]:
  """The setting's (method, control) differences on the seeds both finished (both reported)."""
  out = []
  for method, control in plan.setting.paired:
    if method not in final_by_seed or control not in final_by_seed:
      continue
    common = sorted(set(final_by_seed[method]) & set(final_by_seed[control]))
    diffs = [final_by_seed[method][s] - final_by_seed[control][s] for s in common]
    if diffs:
      mean, half = interval(diffs)
      out.append(dict(method=method, control=control, seeds=common, per_seed=diffs,
                      difference=mean, ci95=half))
  return out


def _span(seeds: tuple) -> str:
  return f'{seeds[0]}-{seeds[-1]}' if tuple(seeds) == tuple(range(seeds[0], seeds[-1] + 1)) \
      else ', '.join(map(str, seeds))


def _mean_curve(metrics: list[list[dict]]) -> list[dict]:
  """The seeds' rows averaged round by round (rounds evaluated in every seed)."""
  by_round = [{m['round']: m for m in ms} for ms in metrics]
  rounds = sorted(set.intersection(*(set(b) for b in by_round)))
  out = []
  for r in rounds:
    row = {'round': r, 'sim_time_s': float(np.mean([b[r]['sim_time_s'] for b in by_round]))}
    for key in ('test_accuracy', 'train_loss'):
      if all(b[r].get(key) is not None for b in by_round):
        row[key] = float(np.mean([b[r][key] for b in by_round]))
    out.append(row)
  return out


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value)
  logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint step at INFO
  if _CACHE.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  try:
    unknown = [s for s in _SETTINGS.value if s not in SETTINGS]
    if unknown:
      raise ConfigError(f'unknown settings {unknown}; choose from {", ".join(SETTINGS)}')
    bad = [m for m in _METHODS.value if m not in METHODS]
    if bad:
      raise ConfigError(f'unknown methods {bad}; choose from {", ".join(METHODS)}')
    for name in _SETTINGS.value:
      plan = Plan.of(name, _METHODS.value, _QUICK.value)
      where = root / name
      stages = ('sweep', 'seeds', 'report') if _STAGE.value == 'all' else (_STAGE.value,)
      record = sweep(plan, where) if 'sweep' in stages else read_sweep(where)
      if 'seeds' in stages:
        seeds(plan, where, record)
      if 'report' in stages:
        print(report(plan, where, record))
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)

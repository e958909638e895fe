r"""The benchmark: CooperLLM against every baseline that also uses the public data, tuned the same
way, three seeds, on settings where the private data differs from the public data.

  python -m experiments.benchmark --workdir=experiments/results/benchmark            # everything
  python -m experiments.benchmark --workdir=... --settings=rt_shifted_minilm_lora --stage=sweep
  python -m experiments.benchmark --workdir=workdir/benchmark_quick --quick          # minutes

Stages, in order (--stage=all runs the three):
  sweep   every method of a setting at each learning rate of its grid (5 log-spaced values), seed 0.
          The rate is picked by the final accuracy on a validation split held out of the clients'
          data (data.validation_fraction); the test split is never looked at. A pick at the edge
          of the grid is flagged in the table (the grid should be widened there).
  seeds   the picked rate at seeds 0, 1, 2 (seed 0 is the sweep's run).
  report  workdir/<setting>/table.md|json: final test accuracy as mean and 95% t-interval over the
          seeds; rounds, client forward passes and simulated seconds to the target (the best final
          mean accuracy among the baselines, cloud_only and warm_start included); bytes per
          client and round; accuracy.png / accuracy_vs_time.png (seed means).

Every run lives in workdir/<setting>/runs/<method>/lr=<lr>/seed=<seed>/. A finished run whose
config matches is read back, not rerun; an interrupted one resumes from its newest checkpoint, so
the sweep spans sessions. warm_start's cloud rounds use cloud_only's picked rate, so cloud_only is
swept first; its cloud phase is the first half of the rounds. --quick shrinks every setting (rounds, clients, grid, seeds) to check the pipeline.
"""

import dataclasses
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

from cooperllm_jax.errors import ConfigError, CooperError

# The main setting's data: Rotten Tomatoes reviews on 200 clients (Dirichlet label skew, 20 a
# round, FedSGD), the cloud holding 256 sentiment snippets of other domains (VADER's Amazon
# reviews and tweets). max_length 32 holds 70% of the review snippets whole (median 27 tokens).
# Test 10% (1,281 reviews) and validation 5% (640): an evaluation costs as much as 50 client steps.
_RT = ('dataset=rotten_tomatoes', 'max_length=32', 'num_clients=200', 'clients_per_round=20',
       'partition=dirichlet', 'dirichlet_alpha=1.0', 'min_client_size=4', 'test_fraction=0.1',
       'validation_fraction=0.05', 'local_steps=1', 'batch_size=8', 'eval_batch_size=128',
       'cloud.public_examples=256', 'checkpoint_every=10', 'ledger=False', 'tensorboard=False',
       'zo.distribution=gaussian')
_SHIFTED = ('public_fraction=0', 'cloud.public_dataset=vader_amazon+vader_tweets')
_IN_DOMAIN = ('public_fraction=0.02',)   # 256 of the reviews themselves
_LORA = ('zo.trainable=lora',)

# Learning-rate grids (5 values, half a decade apart) by method family: the ZO rate moves the
# scalar-weighted directions, the BP rate is AdamW's. A setting may replace them (full
# fine-tuning's ZO rate is orders smaller: the step grows with the trained dimension).
GRIDS = {'zo': (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), 'bp': (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Method:
  algorithm: str                # registered name
  overrides: tuple = ()
  family: str = 'zo'            # its learning-rate grid
  rate_of: Optional[str] = None  # an ablation: no sweep of its own, this method's picked rate


COOPERLLM = ('zgr.alpha=0.5', 'zgr.adaptive=False')   # pinned: the runs keep their config
METHODS = {
    'cloud_only': Method('cloud_only', family='bp'),
    'cooperllm': Method('cooperllm', COOPERLLM),
    'fedmezo': Method('fedmezo'),
    'warm_start': Method('warm_start'),
    'fedkseed': Method('fedkseed'),
    'decomfl': Method('decomfl'),
    'fwdllm': Method('fwdllm', ('zo.probes=4',)),
    'fedavg_bp': Method('fedavg_bp', family='bp'),
    # ZGR ablations at cooperllm's picked rate: the mixing weight, and a cloud without signal.
    'cooperllm_adaptive': Method('cooperllm', ('zgr.adaptive=True',), rate_of='cooperllm'),
    'cooperllm_alpha=0.25': Method('cooperllm', ('zgr.alpha=0.25', 'zgr.adaptive=False'),
                                   rate_of='cooperllm'),
    'cooperllm_alpha=0.75': Method('cooperllm', ('zgr.alpha=0.75', 'zgr.adaptive=False'),
                                   rate_of='cooperllm'),
    'cooperllm_shuffled_adaptive': Method('cooperllm', ('zgr.adaptive=True',
                                                        'cloud.shuffle_labels=True'),
                                          rate_of='cooperllm'),
    'cooperllm_shuffled': Method('cooperllm', COOPERLLM + ('cloud.shuffle_labels=True',),
                                 rate_of='cooperllm'),
}
MAIN_METHODS = ('cloud_only', 'cooperllm', 'fedmezo', 'warm_start', 'fedkseed', 'decomfl',
                'fwdllm', 'fedavg_bp')
ZGR_CHECKS = ('cooperllm', 'fedmezo', 'cooperllm_adaptive', 'cooperllm_alpha=0.25',
              'cooperllm_alpha=0.75', 'cooperllm_shuffled_adaptive', 'cooperllm_shuffled')


@dataclasses.dataclass(frozen=True)
class Setting:
  about: str
  overrides: tuple
  rounds: int
  eval_every: int
  methods: tuple = MAIN_METHODS
  grids: Optional[dict] = None  # family -> rates; None: GRIDS


SETTINGS = {
    'rt_shifted_minilm_lora': Setting(
        'Rotten Tomatoes on 200 clients, public: 256 VADER Amazon + tweet snippets (another '
        'domain); MiniLM, LoRA (q, v; rank 8) + head', _RT + _SHIFTED + _LORA, 40, 10),
    'rt_indomain_minilm_lora': Setting(
        'as rt_shifted_minilm_lora, but the public set is 256 Rotten Tomatoes reviews (the '
        'in-distribution case)', _RT + _IN_DOMAIN + _LORA, 40, 10),
    # ZGR at real dimensions on the embedded default's task (demo.py: 10 clients, 4 a round, 8
    # local steps, 112 in-domain public articles), plain ZO against guided ZO and its ablations.
    'bbc_minilm_lora': Setting(
        'BBC News on 10 clients, in-domain public set; MiniLM, LoRA (q, v; rank 8) + head',
        ('validation_fraction=0.1', 'zo.trainable=lora', 'zo.distribution=gaussian',
         'ledger=False', 'tensorboard=False'), 20, 5, ZGR_CHECKS),
    'bbc_minilm_full': Setting(
        'BBC News on 10 clients, in-domain public set; MiniLM, every weight trained',
        ('validation_fraction=0.1', 'zo.trainable=full', 'zo.distribution=gaussian',
         'ledger=False', 'tensorboard=False'), 10, 5, ('cooperllm', 'fedmezo'),
        {'zo': (1e-7, 3e-7, 1e-6, 3e-6, 1e-5)}),
}

# --quick: the same settings, shrunk so that the whole pipeline runs in minutes.
QUICK = dict(rounds=2, eval_every=1, grid=2, seeds=(0, 1),
             overrides=('num_clients=20', 'clients_per_round=4', 'checkpoint_every=0',
                        'test_fraction=0.02', 'validation_fraction=0.02'),
             methods=('cloud_only', 'cooperllm', 'fedmezo', 'warm_start'))

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the runs and tables.', required=True)
_SETTINGS = flags.DEFINE_list('settings', list(SETTINGS), 'Settings to run.')
_METHODS = flags.DEFINE_list('methods', [], "Methods to run (default: the setting's).")
_STAGE = flags.DEFINE_enum('stage', 'all', ['all', 'sweep', 'seeds', 'report'], 'Stages to run.')
_QUICK = flags.DEFINE_bool('quick', False, 'Shrink every setting: check the pipeline in minutes.')
_CACHE = flags.DEFINE_string('compilation_cache', 'workdir/jax_cache',
                             "JAX's persistent compilation cache (the runs share most programs); "
                             "'' = off.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """One setting as it runs: its rounds, methods, grids and seeds (shrunk by --quick)."""
  name: str
  setting: Setting
  methods: tuple
  grids: dict
  seeds: tuple
  overrides: tuple

  @classmethod
  def of(cls, name: str, methods=(), quick: bool = False) -> 'Plan':
    s = SETTINGS[name]
    methods = tuple(methods) or (QUICK['methods'] if quick else s.methods)
    grids = s.grids or GRIDS
    overrides = s.overrides + (f'rounds={s.rounds}', f'eval_every={s.eval_every}')
    seeds = SEEDS
    if quick:
      grids = {k: g[len(g) // 2:len(g) // 2 + QUICK['grid']] for k, g in grids.items()}
      overrides = s.overrides + QUICK['overrides'] + (f'rounds={QUICK["rounds"]}',
                                                      f'eval_every={QUICK["eval_every"]}')
      seeds = QUICK['seeds']
    return cls(name, s, methods, grids, seeds, overrides)

  def grid(self, method: str) -> tuple:
    return self.grids[METHODS[method].family]

  def variant(self, method: str, lr: float, seed: int, picked: dict) -> tuple:
    """(algorithm, overrides) of one run; warm_start's cloud rounds take cloud_only's pick."""
    m = METHODS[method]
    overrides = self.overrides + m.overrides + (f'learning_rate={lr}', f'seed={seed}')
    if method == 'warm_start':
      if 'cloud_only' not in picked:
        raise ConfigError(f'{self.name}: warm_start needs cloud_only\'s picked rate: sweep '
                          'cloud_only first (add it to --methods)')
      overrides += (f'cloud.learning_rate={picked["cloud_only"]}',
                    f'warm.rounds={max(1, self.rounds // 2)}')
    return m.algorithm, overrides

  @property
  def rounds(self) -> int:
    return int(next(o for o in reversed(self.overrides) if o.startswith('rounds=')).split('=')[1])


def run_dir(root: pathlib.Path, method: str, lr: float, seed: int) -> pathlib.Path:
  return root / 'runs' / method / f'lr={lr:g}' / f'seed={seed}'


def run_one(path: pathlib.Path, algorithm: str, overrides: tuple) -> dict:
  """The summary of one run in `path`: read back when finished with this config, resumed when
  interrupted after a checkpoint, else (re)started."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from experiments.variants import apply_override  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.run import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = demo.get_config(algorithm)
  for o in overrides:
    apply_override(config, o)
  try:   # the same run when the parsed configs agree (a field added since then takes its default)
    saved = ml_collections.ConfigDict(json.loads((path / 'config.json').read_text()))
    same = config_lib.parse(saved) == config_lib.parse(config)
  except (OSError, ValueError, CooperError):
    same = False
  if same and (path / 'summary.json').exists():
    return json.loads((path / 'summary.json').read_text())
  checkpoints = path / 'checkpoints'
  resume = same and checkpoints.is_dir() and any(checkpoints.iterdir())
  print(f'{"resuming" if resume else "running"} {path}', flush=True)
  return train_and_evaluate(config if not resume else saved, path,
                            overwrite=not resume and path.exists(), resume=resume,
                            log=lambda msg: None)


def metrics_of(path: pathlib.Path) -> list[dict]:
  from cooperllm_jax.reporting import read_metrics  # pylint: disable=g-import-not-at-top
  return read_metrics(path / 'metrics.jsonl')


def final_validation(path: pathlib.Path) -> float:
  """The last evaluated row's validation accuracy (what the sweep picks by)."""
  rows = [m for m in metrics_of(path) if m.get('val_accuracy') is not None]
  if not rows:
    raise ConfigError(f'{path}: no validation accuracy logged (validation_fraction = 0?)')
  return rows[-1]['val_accuracy']


def sweep(plan: Plan, root: pathlib.Path) -> dict:
  """Runs each method's grid at the first seed and picks its rate; sweep.json (each rate's final
  validation accuracy and the pick) keeps the methods swept before (--methods runs a few)."""
  record = read_sweep(root) if (root / 'sweep.json').exists() else {}
  picked = {m: r['picked'] for m, r in record.items()}
  # cloud_only first (warm_start's cloud rounds need its pick), the ablations last (they take
  # the pick of the method they vary).
  for method in sorted(plan.methods, key=lambda m: (m != 'cloud_only',
                                                    METHODS[m].rate_of is not None)):
    source, grid = METHODS[method].rate_of, plan.grid(method)
    if source and source not in picked:
      raise ConfigError(f'{plan.name}: {method} runs at {source}\'s picked rate: sweep {source} '
                        'first (add it to --methods)')
    scores = {}
    for lr in (picked[source],) if source else grid:
      path = run_dir(root, method, lr, plan.seeds[0])
      run_one(path, *plan.variant(method, lr, plan.seeds[0], picked))
      scores[lr] = final_validation(path)
    best = max(scores, key=lambda lr: (scores[lr], -lr))   # ties: the smaller rate
    picked[method] = best
    record[method] = {'val_accuracy': {f'{lr:g}': v for lr, v in scores.items()},
                      'picked': best, 'rate_of': source,
                      'at_grid_edge': (record[source]['at_grid_edge'] if source
                                       else best in (grid[0], grid[-1]))}
    print(f'{plan.name}: {method} picks lr {best:g} (validation {scores[best]:.4f})', flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'sweep.json').write_text(json.dumps(record, indent=1))
  return record


def read_sweep(root: pathlib.Path) -> dict:
  try:
    return json.loads((root / 'sweep.json').read_text())
  except (OSError, ValueError):
    raise ConfigError(f'{root / "sweep.json"}: no finished sweep (run --stage=sweep first)') \
        from None


def seeds(plan: Plan, root: pathlib.Path, record: dict) -> None:
  picked = {m: r['picked'] for m, r in record.items()}
  for method in plan.methods:
    if method not in picked:
      raise ConfigError(f'{plan.name}: {method} has no picked rate in sweep.json: sweep it first')
    for seed in plan.seeds:
      run_one(run_dir(root, method, picked[method], seed),
              *plan.variant(method, picked[method], seed, picked))


def interval(values) -> tuple[float, float]:
  """Mean and the half-width of its two-sided 95% Student-t interval (0 for one value)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), 0.0
  return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _to_target(rows: list[dict], target: float) -> Optional[dict]:
  return next((m for m in rows if m.get('test_accuracy', -1.0) >= target - 1e-9), None)


def report(plan: Plan, root: pathlib.Path, record: dict) -> str:
  """table.md / table.json / plots of the seeds' runs at the picked rates."""
  from cooperllm_jax.reporting import plot_accuracy  # pylint: disable=g-import-not-at-top
  runs = {}
  for method in plan.methods:
    lr = record[method]['picked']
    paths = [run_dir(root, method, lr, s) for s in plan.seeds]
    missing = [p for p in paths if not (p / 'summary.json').exists()]
    if missing:
      raise ConfigError(f'{plan.name}: {missing[0]} has not finished: run --stage=seeds first')
    runs[method] = (lr, [json.loads((p / 'summary.json').read_text()) for p in paths],
                    [metrics_of(p) for p in paths])
  finals = {m: interval([s['accuracy_after'] for s in summaries])
            for m, (_, summaries, _) in runs.items()}
  baselines = [m for m in runs if m != 'cooperllm']
  target_by = max(baselines, key=lambda m: finals[m][0]) if baselines else None
  target = finals[target_by][0] if target_by else None
  rows = []
  for method, (lr, summaries, metrics) in runs.items():
    hits = [_to_target(ms, target) if target is not None else None for ms in metrics]
    trained = [[m for m in ms if m['round'] > 0] for ms in metrics]
    forwards = [np.cumsum([m['forwards'] for m in t]) for t in trained]
    reached = [h for h in hits if h is not None]
    rows.append(dict(
        method=method, lr=lr, at_grid_edge=record[method]['at_grid_edge'],
        seeds=len(summaries), accuracy_before=float(np.mean([s['accuracy_before']
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
  lines = [f'# {plan.name}', '', plan.setting.about + '.', '',
           f'{plan.rounds} rounds; learning rates picked on the validation split (seed '
           f'{plan.seeds[0]}); test accuracy over seeds {", ".join(map(str, plan.seeds))}: mean '
           '± half-width of the 95% t-interval. Target: '
           + (f'{target:.4f} ({target_by}\'s mean final accuracy, the best baseline); rounds, '
              'client forwards and simulated seconds to it are seed means, shown only when every '
              'seed reaches it (reached: seeds that did).' if target_by else 'none.')
           + ' *: the picked rate is at the edge of the grid.', '',
           '| method | lr | test accuracy | validation | reached | rounds to target | '
           'client forwards to target | sim s to target | up B/client/round | '
           'down B/client/round | train s (CPU) |', '| --- ' * 11 + '|']
  fmt = lambda v, f: '—' if v is None else f.format(v)
  for r in rows:
    lines.append(f'| {r["method"]} | {r["lr"]:g}{"*" if r["at_grid_edge"] else ""} | '
                 f'{r["accuracy"]:.4f} ± {r["accuracy_ci95"]:.4f} | {r["val_accuracy"]:.4f} | '
                 f'{r["reached"]} | {fmt(r["rounds_to_target"], "{:.1f}")} | '
                 f'{fmt(r["forwards_to_target"], "{:,.0f}")} | '
                 f'{fmt(r["sim_s_to_target"], "{:,.1f}")} | {r["bytes_up_per_client"]:,.0f} | '
                 f'{r["bytes_down_per_client"]:,.0f} | {r["train_seconds"]:.0f} |')
  table = '\n'.join(lines) + '\n'
  (root / 'table.md').write_text(table, encoding='utf-8')
  (root / 'table.json').write_text(json.dumps(
      {'setting': plan.name, 'about': plan.setting.about, 'overrides': plan.overrides,
       'target': target, 'target_by': target_by, 'rows': rows}, indent=1))
  curves = {m: _mean_curve(metrics) for m, (_, _, metrics) in runs.items()}
  for x, name in (('round', 'accuracy.png'), ('sim_time_s', 'accuracy_vs_time.png')):
    plot_accuracy(curves, root / name, f'{plan.name}: test accuracy (mean of {len(plan.seeds)} '
                  'seeds)', x=x, target=target)
  return table


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

"""Running named config variants and reporting them side by side (experiments.reproduce and
experiments.ablate_zgr share this; no flags are defined here, so both entry points can import it)."""

import ast
import json
import pathlib

from cooperllm_jax.errors import ConfigError

# The zeroth-order baselines CooperLLM is measured against (fedavg_bp is first-order: the bound).
ZO_BASELINES = ('fedmezo', 'fedkseed', 'decomfl', 'fwdllm')
# The committed tables of reproduce and ablate_zgr (experiments/results) were run with threefry
# Gaussian directions; their runs pin it whatever zo.distribution's default, so a rerun reads the
# committed runs back (same config) and draws the same bits.
RECORDED = ('zo.distribution=gaussian',)


def apply_override(config, override: str):
  """config[key] = value for 'a.b=value' (value parsed as a Python literal, else a string)."""
  key, sep, value = override.partition('=')
  if not sep:
    raise ConfigError(f'override {override!r} is not key=value')
  node = config
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  try:
    node[leaf] = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    node[leaf] = value  # a bare string, e.g. zo.trainable=lora


def first_reaching(metrics: list[dict], target: float):
  """The first row whose test accuracy reaches `target` (None if none does): its round and
  sim_time_s are the rounds and simulated seconds to the target."""
  for m in metrics:
    if m.get('test_accuracy', -1.0) >= target - 1e-9:
      return m
  return None


def best_zo_baseline(results: dict):
  """The name of the ZO baseline run (ZO_BASELINES) with the highest final accuracy, or None."""
  zo = [name for name, (config, _, _) in results.items() if config.algorithm in ZO_BASELINES]
  return max(zo, key=lambda name: results[name][1]['accuracy_after'], default=None)


def run_variants(root: pathlib.Path, variants: dict, overwrite: bool) -> dict:
  """Runs {name: (algorithm, [overrides])} (demo.py's config per algorithm) into root/name and
  returns {name: (config, summary, metrics)}. A run already finished in root/name with the same
  config is read back, not rerun (an interrupted sweep resumes where it stopped)."""
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.run import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.reporting import read_metrics  # pylint: disable=g-import-not-at-top
  out = {}
  for name, (algorithm, overrides) in variants.items():
    config = demo.get_config(algorithm)
    for o in overrides:
      apply_override(config, o)
    done = root / name / 'summary.json'
    if not overwrite and done.exists() and json.loads(
        (root / name / 'config.json').read_text()) == json.loads(config.to_json()):
      summary = json.loads(done.read_text())   # finished earlier with this very config: reuse it
    else:
      summary = train_and_evaluate(config, root / name, overwrite=overwrite)
    out[name] = (config, summary, read_metrics(root / name / 'metrics.jsonl'))
  return out


# table.md's columns: (header, table.json key, format of a value; a missing value is shown as —).
_COLUMNS = (
    ('run', 'run', '{}'), ('rounds', 'rounds', '{}'),
    ('accuracy before', 'accuracy_before', '{:.3f}'),
    ('final accuracy', 'accuracy_final', '{:.3f}'),
    ('{baseline} at equal rounds', 'baseline_same_round', '{:.3f}'),
    ('rounds to target', 'rounds_to_target', '{}'),
    ('sim s to target', 'sim_s_to_target', '{:,.1f}'),
    ('speed-up (rounds)', 'speedup_rounds', '{:.2f}x'),
    ('speed-up (sim time)', 'speedup_sim_time', '{:.2f}x'),
    ('client memory MiB', 'memory_mib', '{:.1f}'),
    ('up B/client/round', 'bytes_up_per_client', '{:,.0f}'),
    ('down B/client/round', 'bytes_down_per_client', '{:,.0f}'),
    ('forwards', 'forwards', '{:,}'), ('backwards', 'backwards', '{:,}'),
    ('sim time s', 'sim_time_s', '{:,.1f}'), ('train s (real CPU)', 'train_seconds', '{:.0f}'))


def _check_sim_time(name: str, summary: dict, metrics: list[dict]) -> None:
  """Times to target come only from the run's own simulated clock, never from a stand-in."""
  if 'sim_time_s' not in summary or any('sim_time_s' not in m for m in metrics):
    raise ConfigError(f'run {name!r} has no simulated time (sim_time_s) in its summary.json or '
                      'metrics.jsonl: it was written before simulated time was recorded; rerun it '
                      'with --overwrite')


def _ratio(base, this):
  """base / this, a speed-up; None unless both are positive (not reached, or reached untrained)."""
  return base / this if base and this else None


def write_report(root: pathlib.Path, results: dict, title: str, baseline: str = None,
                 target: float = None) -> str:
  """table.md / table.json / accuracy.png / accuracy_vs_time.png for `results` (run_variants'
  output); returns table.md's text.

  Every run is measured by the rounds and simulated seconds it needs to reach `target`, speed-ups
  as `baseline`'s over its. baseline defaults to the best ZO baseline (best_zo_baseline) and
  target to baseline's final accuracy: how much sooner a run gets where plain ZO ends up.
  """
  from cooperllm_jax.reporting import plot_accuracy  # pylint: disable=g-import-not-at-top
  for name, (_, summary, metrics) in results.items():
    _check_sim_time(name, summary, metrics)
  baseline = baseline or best_zo_baseline(results)
  if target is not None:
    note = '(given)'
  elif baseline is None:
    raise ConfigError(f'no ZO baseline ({", ".join(ZO_BASELINES)}) among the runs to take the '
                      'target accuracy from: pass a target')
  else:
    target, note = results[baseline][1]['accuracy_after'], f"({baseline}'s final accuracy)"
  base = results[baseline][2] if baseline else []
  base_hit = first_reaching(base, target) or {}
  base_acc = {m['round']: m['test_accuracy'] for m in base if 'test_accuracy' in m}
  rows = []
  for name, (config, summary, metrics) in results.items():
    trained = [m for m in metrics if m['round'] > 0]
    hit = first_reaching(metrics, target) or {}
    rows.append(dict(
        run=name, algorithm=config.algorithm, rounds=config.rounds,
        accuracy_before=summary['accuracy_before'], accuracy_final=summary['accuracy_after'],
        baseline_same_round=base_acc.get(config.rounds), rounds_to_target=hit.get('round'),
        sim_s_to_target=hit.get('sim_time_s'),
        speedup_rounds=_ratio(base_hit.get('round'), hit.get('round')),
        speedup_sim_time=_ratio(base_hit.get('sim_time_s'), hit.get('sim_time_s')),
        memory_mib=summary['client_memory_bytes'] / 2**20,
        bytes_up_per_client=sum(m['bytes_up_per_client'] for m in trained) / len(trained),
        bytes_down_per_client=sum(m['bytes_down_per_client'] for m in trained) / len(trained),
        forwards=sum(m['forwards'] for m in trained),
        backwards=sum(m['backwards'] for m in trained),
        sim_time_s=summary['sim_time_s'], train_seconds=summary['train_seconds']))
  lines = [f'Target accuracy {target:.3f} {note}. '
           + (f"Speed-up: {baseline}'s rounds (simulated seconds) to the target over the run's. "
              if baseline else '')
           + 'Simulated time follows the runs\' system model; train s is real CPU time. '
           '— : not reached or not measured.', '',
           '| ' + ' | '.join(h.format(baseline=baseline or 'baseline') for h, _, _ in _COLUMNS)
           + ' |', '| --- ' * len(_COLUMNS) + '|']
  lines += ['| ' + ' | '.join('—' if row[key] is None else fmt.format(row[key])
                              for _, key, fmt in _COLUMNS) + ' |' for row in rows]
  table = '\n'.join(lines) + '\n'
  (root / 'table.md').write_text(table, encoding='utf-8')
  (root / 'table.json').write_text(json.dumps(
      {'target': target, 'baseline': baseline, 'runs': rows}, indent=1))
  curves = {name: r[2] for name, r in results.items()}
  plot_accuracy(curves, root / 'accuracy.png', f'{title}: test accuracy vs round', target=target)
  plot_accuracy(curves, root / 'accuracy_vs_time.png', f'{title}: test accuracy vs simulated time',
                x='sim_time_s', target=target)
  return table

"""Running named config variants and reporting them side by side (experiments.compare and
experiments.ablate_zgr share this; no flags are defined here, so both entry points can import it)."""

import ast
import json
import pathlib

from cooperllm_jax.errors import ConfigError


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


def rounds_to(metrics: list[dict], target: float):
  """The first round whose test accuracy reaches `target` (None if none does)."""
  for m in metrics:
    if m.get('test_accuracy', -1.0) >= target - 1e-9:
      return m['round']
  return None


def run_variants(root: pathlib.Path, variants: dict, overwrite: bool) -> dict:
  """Runs {name: (algorithm, [overrides])} (demo.py's config per algorithm) into root/name and
  returns {name: (config, summary, metrics)}. A run already finished in root/name with the same
  config is read back, not rerun (an interrupted sweep resumes where it stopped)."""
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
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


def write_report(root: pathlib.Path, results: dict, baseline: str, title: str) -> str:
  """table.md / table.json / accuracy.png for `results` (run_variants' output). Speed-ups are
  against `baseline`: rounds to reach the baseline's final accuracy, and accuracy at its rounds."""
  from cooperllm_jax.reporting import plot_accuracy  # pylint: disable=g-import-not-at-top
  target = results[baseline][1]['accuracy_after']
  base_rounds = rounds_to(results[baseline][2], target)
  base_acc = {m['round']: m['test_accuracy'] for m in results[baseline][2] if 'test_accuracy' in m}
  header = ('| run | rounds | accuracy before | after | ' + f'{baseline} at that round'
            + ' | rounds to ' + f'{baseline} final ({target:.3f})'
            + ' | speed-up | up B/client/round | down B/client/round | forwards | backwards | '
            'client memory MiB | train s |\n' + '| --- ' * 13 + '|\n')
  lines, rows = [], []
  for name, (config, summary, metrics) in results.items():
    trained = [m for m in metrics if m['round'] > 0]
    reach = rounds_to(metrics, target)
    speedup = base_rounds / reach if reach and base_rounds else None
    row = dict(run=name, rounds=config.rounds, before=summary['accuracy_before'],
               after=summary['accuracy_after'], baseline_same_round=base_acc.get(config.rounds),
               rounds_to_target=reach, speedup=speedup,
               up=sum(m['bytes_up_per_client'] for m in trained) / len(trained),
               down=sum(m['bytes_down_per_client'] for m in trained) / len(trained),
               forwards=sum(m['forwards'] for m in trained),
               backwards=sum(m['backwards'] for m in trained),
               memory_mib=summary['client_memory_bytes'] / 2**20,
               seconds=summary['train_seconds'])
    rows.append(row)
    same = row['baseline_same_round']
    lines.append(f'| {name} | {row["rounds"]} | {row["before"]:.3f} | {row["after"]:.3f} | '
                 f'{"-" if same is None else f"{same:.3f}"} | '
                 f'{reach if reach is not None else "not reached"} | '
                 f'{f"{speedup:.1f}x" if speedup else "-"} | {row["up"]:,.0f} | {row["down"]:,.0f} | '
                 f'{row["forwards"]:,} | {row["backwards"]:,} | {row["memory_mib"]:.1f} | '
                 f'{row["seconds"]:.0f} |')
  table = header + '\n'.join(lines) + '\n'
  (root / 'table.md').write_text(table)
  (root / 'table.json').write_text(json.dumps(rows, indent=1))
  plot_accuracy({name: r[2] for name, r in results.items()}, root / 'accuracy.png', title)
  return table

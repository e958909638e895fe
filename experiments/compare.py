r"""Runs several algorithms on one config and writes a markdown table and an accuracy-vs-round plot.

  python -m experiments.compare --workdir=workdir/compare \
      --algorithms=cooperllm,fedmezo,fedkseed,decomfl,fwdllm,fedavg_bp --rounds=40

Each algorithm runs `experiments/configs/demo.py:<algorithm>` (its tuned rate) in its own
subdirectory; --set entries (key=value) apply to all of them. `run_variants` and `write_report` are
shared with the ablation script (experiments/ablate_zgr.py).
"""

import ast
import json
import pathlib
import sys

from absl import app
from absl import flags

from cooperllm_jax.errors import CooperError

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs, table and plot.',
                               required=True)
_ALGORITHMS = flags.DEFINE_list('algorithms', 'cooperllm,fedmezo,fedkseed,decomfl,fwdllm,fedavg_bp',
                                'Registered algorithm names.')
_ROUNDS = flags.DEFINE_integer('rounds', None, 'Rounds per run (default: the config\'s).')
_BP_ROUNDS = flags.DEFINE_integer('bp_rounds', None, 'Rounds for fedavg_bp (default: --rounds).')
_OVERRIDES = flags.DEFINE_multi_string('set', [], 'config overrides key=value, e.g. zo.probes=2')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing run directories.')


def apply_override(config, override: str):
  """config[key] = value for 'a.b=value' (value parsed as a Python literal, else a string)."""
  key, sep, value = override.partition('=')
  if not sep:
    raise CooperError(f'override {override!r} is not key=value')
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
  returns {name: (config, summary, metrics)}."""
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.reporting import read_metrics  # pylint: disable=g-import-not-at-top
  out = {}
  for name, (algorithm, overrides) in variants.items():
    config = demo.get_config(algorithm)
    for o in overrides:
      apply_override(config, o)
    summary = train_and_evaluate(config, root / name, overwrite=overwrite)
    out[name] = (config, summary, read_metrics(root / name / 'metrics.jsonl'))
  return out


def write_report(root: pathlib.Path, results: dict, baseline: str, title: str) -> str:
  """table.md / table.json / accuracy.png for `results` (run_variants' output). Speed-ups are
  against `baseline`: rounds to reach the baseline's final accuracy, and accuracy at its rounds."""
  from cooperllm_jax.reporting import plot_accuracy  # pylint: disable=g-import-not-at-top
  target = results[baseline][1]['accuracy_after']
  base_rounds = rounds_to(results[baseline][2], target)
  header = ('| run | rounds | accuracy before | after | rounds to ' + f'{baseline} final ({target:.3f})'
            + ' | speed-up | up B/client/round | down B/client/round | forwards | backwards | '
            'client memory MiB | train s |\n' + '| --- ' * 12 + '|\n')
  lines, rows = [], []
  for name, (config, summary, metrics) in results.items():
    trained = [m for m in metrics if m['round'] > 0]
    reach = rounds_to(metrics, target)
    speedup = base_rounds / reach if reach and base_rounds else None
    row = dict(run=name, rounds=config.rounds, before=summary['accuracy_before'],
               after=summary['accuracy_after'], rounds_to_target=reach, speedup=speedup,
               up=sum(m['bytes_up_per_client'] for m in trained) / len(trained),
               down=sum(m['bytes_down_per_client'] for m in trained) / len(trained),
               forwards=sum(m['forwards'] for m in trained),
               backwards=sum(m['backwards'] for m in trained),
               memory_mib=summary['client_memory_bytes'] / 2**20,
               seconds=summary['train_seconds'])
    rows.append(row)
    lines.append(f'| {name} | {row["rounds"]} | {row["before"]:.3f} | {row["after"]:.3f} | '
                 f'{reach if reach is not None else "not reached"} | '
                 f'{f"{speedup:.1f}x" if speedup else "-"} | {row["up"]:,.0f} | {row["down"]:,.0f} | '
                 f'{row["forwards"]:,} | {row["backwards"]:,} | {row["memory_mib"]:.1f} | '
                 f'{row["seconds"]:.0f} |')
  table = header + '\n'.join(lines) + '\n'
  (root / 'table.md').write_text(table)
  (root / 'table.json').write_text(json.dumps(rows, indent=1))
  plot_accuracy({name: r[2] for name, r in results.items()}, root / 'accuracy.png', title)
  return table


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value)
  variants = {}
  for name in _ALGORITHMS.value:
    rounds = _BP_ROUNDS.value if name == 'fedavg_bp' and _BP_ROUNDS.value else _ROUNDS.value
    variants[name] = (name, list(_OVERRIDES.value) + ([f'rounds={rounds}'] if rounds else []))
  try:
    results = run_variants(root, variants, _OVERWRITE.value)
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  baseline = 'fedmezo' if 'fedmezo' in results else next(iter(results))
  print(write_report(root, results, baseline, 'test accuracy vs round'))


if __name__ == '__main__':
  app.run(main)

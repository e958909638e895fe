r"""Runs several algorithms on one config and writes a markdown table and an accuracy-vs-round plot.

  python -m experiments.compare --workdir=workdir/compare \
      --algorithms=fedmezo,fedkseed,decomfl,fwdllm,fedavg_bp --rounds=40

Each algorithm runs `experiments/configs/demo.py:<algorithm>` (its tuned rate) in its own
subdirectory; --config_override entries (key=value) apply to all of them.
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
_ALGORITHMS = flags.DEFINE_list('algorithms', 'fedmezo,fedkseed,decomfl,fwdllm,fedavg_bp',
                                'Registered algorithm names.')
_ROUNDS = flags.DEFINE_integer('rounds', None, 'Rounds per run (default: the config\'s).')
_BP_ROUNDS = flags.DEFINE_integer('bp_rounds', None, 'Rounds for fedavg_bp (default: --rounds).')
_OVERRIDES = flags.DEFINE_multi_string('set', [], 'config overrides key=value, e.g. zo.probes=2')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing run directories.')


def _apply(config, override: str):
  key, _, value = override.partition('=')
  node = config
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  try:
    node[leaf] = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    node[leaf] = value  # a bare string, e.g. zo.trainable=lora


def main(argv):
  del argv
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.reporting import plot_accuracy, read_metrics  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(_WORKDIR.value)
  rows, runs = [], {}
  try:
    for name in _ALGORITHMS.value:
      config = demo.get_config(name)
      for o in _OVERRIDES.value:
        _apply(config, o)
      rounds = _BP_ROUNDS.value if name == 'fedavg_bp' and _BP_ROUNDS.value else _ROUNDS.value
      if rounds:
        config.rounds = rounds
      summary = train_and_evaluate(config, root / name, overwrite=_OVERWRITE.value)
      metrics = read_metrics(root / name / 'metrics.jsonl')
      runs[name] = metrics
      trained = [m for m in metrics if m['round'] > 0]
      rows.append((name, config.rounds, summary['accuracy_before'], summary['accuracy_after'],
                   sum(m['bytes_up_per_client'] for m in trained) / len(trained),
                   sum(m['bytes_down_per_client'] for m in trained) / len(trained),
                   sum(m['forwards'] for m in trained), sum(m['backwards'] for m in trained),
                   summary['client_memory_bytes'], summary['train_seconds']))
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  header = ('| algorithm | rounds | accuracy before | after | up B/client/round | '
            'down B/client/round | forwards | backwards | client memory MiB | train s |\n'
            '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n')
  lines = [f'| {n} | {r} | {a0:.3f} | {a1:.3f} | {up:,.0f} | {down:,.0f} | {f:,} | {b:,} | '
           f'{mem / 2**20:.1f} | {s:.0f} |' for n, r, a0, a1, up, down, f, b, mem, s in rows]
  table = header + '\n'.join(lines) + '\n'
  (root / 'table.md').write_text(table)
  (root / 'table.json').write_text(json.dumps(rows, indent=1))
  plot_accuracy(runs, root / 'accuracy.png', 'test accuracy vs round')
  print(table)


if __name__ == '__main__':
  app.run(main)

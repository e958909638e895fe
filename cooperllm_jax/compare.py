r"""The `cooperllm-compare` console script (`python -m experiments.compare` in a checkout): several
runs side by side, in any layout.

  cooperllm-compare --runs='workdir/*' --out=workdir/compare
  cooperllm-compare --runs=workdir/fedmezo,workdir/cooperllm --out=/tmp/cmp

--runs takes run directories and globs of them, comma-separated: every match must hold a run that
cooperllm-train wrote (config.json and metrics.jsonl; a run still going or stopped early counts).
--out gets table.md and table.json, one row per run (algorithm, rounds, test accuracy at the start,
the end and its best, validation accuracy, the divergence guard's rollbacks, the learning rate of
the first and the last round, bytes per client and round, simulated and training time), and
comparison.png (test accuracy against rounds, simulated time and the bytes each client moved; the
learning rate against rounds with the rollbacks marked). The table is printed too. --out holds
nothing else: a directory with other files in it is refused.
"""

import glob
import json
import os
import pathlib

from absl import flags

from cooperllm_jax import cli
from cooperllm_jax.errors import ConfigError

_RUNS = flags.DEFINE_list('runs', None, 'Run directories or globs of them, comma-separated.',
                          required=True)
_OUT = flags.DEFINE_string('out', None, 'Directory for table.md, table.json and comparison.png.',
                           required=True)

_OUTPUTS = ('table.md', 'table.json', 'comparison.png')
# table.md's columns: (header, key of a row, format of a value; a missing value is shown as —).
_COLUMNS = (('run', 'run', '{}'), ('algorithm', 'algorithm', '{}'), ('rounds', 'rounds', '{}'),
           ('accuracy before', 'accuracy_before', '{:.3f}'),
           ('accuracy after', 'accuracy_after', '{:.3f}'),
           ('best accuracy', 'accuracy_best', '{:.3f}'),
           ('val accuracy', 'val_accuracy_after', '{:.3f}'),
           ('rollbacks', 'rollbacks', '{}'), ('first rate', 'learning_rate_first', '{:.3g}'),
           ('last rate', 'learning_rate_last', '{:.3g}'),
           ('up B/client/round', 'bytes_up_per_client', '{:,.0f}'),
           ('down B/client/round', 'bytes_down_per_client', '{:,.0f}'),
           ('sim time s', 'sim_time_s', '{:,.1f}'), ('train s', 'train_seconds', '{:.0f}'))


def _holds_run(path: pathlib.Path) -> bool:
  return all((path / name).is_file() for name in ('config.json', 'metrics.jsonl'))


def _find_runs(patterns: list[str]) -> list[pathlib.Path]:
  """The run directories the patterns name, in order and each once: a glob's matches that hold no
  run (a log file beside the runs) are passed over; a directory named outright that holds none,
  or a pattern with no run among its matches, is a one-line ConfigError."""
  runs = []
  for pattern in patterns:
    matches = [pathlib.Path(m) for m in sorted(glob.glob(os.path.expanduser(pattern)))]
    if not any(c in pattern for c in '*?['):
      matches = matches or [pathlib.Path(pattern)]
      if not _holds_run(matches[0]):
        raise ConfigError(f'--runs: {pattern} holds no run (no config.json and metrics.jsonl)')
    found = [m for m in matches if _holds_run(m)]
    if not found:
      raise ConfigError(f'--runs: no run among the matches of {pattern!r}')
    runs += [m for m in found if m.resolve() not in {r.resolve() for r in runs}]
  return runs


def _names(runs: list[pathlib.Path]) -> list[str]:
  """Each run's name: its path below the runs' common directory (its own name if there is one)."""
  if len(runs) == 1:
    return [runs[0].resolve().name]
  common = pathlib.Path(os.path.commonpath([r.resolve() for r in runs]))
  return [str(r.resolve().relative_to(common)) for r in runs]


def _mean(rows: list[dict], key: str):
  values = [row[key] for row in rows if key in row]
  return sum(values) / len(values) if values else None


def _row(name: str, config: dict, summary: dict, rows: list[dict]) -> dict:
  """A run's line of the table, from its metrics rows (a run still going has no summary.json:
  `summary` is then {}, and the times it alone holds are missing)."""
  tested = [r for r in rows if r.get('test_accuracy') is not None]
  trained = [r for r in rows if r['round'] > 0]
  rates = [r['learning_rate'] for r in trained if 'learning_rate' in r]
  validated = [r['val_accuracy'] for r in rows if r.get('val_accuracy') is not None]
  return {'run': name, 'algorithm': config.get('algorithm'), 'rounds': rows[-1]['round'],
          'accuracy_before': tested[0]['test_accuracy'] if tested else None,
          'accuracy_after': tested[-1]['test_accuracy'] if tested else None,
          'accuracy_best': max((r['test_accuracy'] for r in tested), default=None),
          'val_accuracy_after': validated[-1] if validated else None,
          'rollbacks': sum(bool(r.get('rollback')) for r in rows),
          'learning_rate_first': rates[0] if rates else None,
          'learning_rate_last': rates[-1] if rates else None,
          'bytes_up_per_client': _mean(trained, 'bytes_up_per_client'),
          'bytes_down_per_client': _mean(trained, 'bytes_down_per_client'),
          'sim_time_s': rows[-1].get('sim_time_s'), 'train_seconds': summary.get('train_seconds')}


def _table(rows: list[dict]) -> str:
  """table.md: one line per run."""
  lines = ['| ' + ' | '.join(h for h, _, _ in _COLUMNS) + ' |', '| --- ' * len(_COLUMNS) + '|']
  lines += ['| ' + ' | '.join('—' if r[key] is None else fmt.format(r[key])
                              for _, key, fmt in _COLUMNS) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def _check_out(out: pathlib.Path, runs: list[pathlib.Path]) -> None:
  """--out is a directory of its own: no run's, and holding nothing but this command's outputs."""
  if out.resolve() in {r.resolve() for r in runs}:
    raise ConfigError(f'--out {out} is one of the runs; name a directory of its own')
  if out.exists() and not out.is_dir():
    raise ConfigError(f'--out {out} is a file, not a directory')
  foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUTS) if out.exists() else []
  if foreign:
    raise ConfigError(f'--out {out} holds {foreign[0]!r}, which this command does not write; '
                      'name another directory')


def compare(patterns: list[str], out) -> str:
  """Writes table.md, table.json and comparison.png of the runs `patterns` name to `out`;
  returns table.md's text."""
  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.reporting import plot_comparison, read_metrics, to_json, write_text
  runs, out = _find_runs(patterns), pathlib.Path(out)
  _check_out(out, runs)
  curves, lines = {}, []
  for name, run in zip(_names(runs), runs):
    rows = read_metrics(run / 'metrics.jsonl')
    if not rows:
      raise ConfigError(f'--runs: {run} has no rounds in metrics.jsonl yet')
    summary = run / 'summary.json'
    lines.append(_row(name, json.loads((run / 'config.json').read_text()),
                     json.loads(summary.read_text()) if summary.is_file() else {}, rows))
    curves[name] = rows
  out.mkdir(parents=True, exist_ok=True)
  text = _table(lines)
  write_text(out / 'table.md', text)
  write_text(out / 'table.json', to_json({'runs': lines}, indent=1))
  plot_comparison(curves, out / 'comparison.png', f'{len(runs)} runs compared')
  return text


def _main(argv) -> None:
  del argv  # cli.run refuses positional arguments
  with cli.main_errors():
    print(compare(_RUNS.value, _OUT.value), end='')


def main() -> None:
  """The console script's entry point (pyproject.toml [project.scripts])."""
  cli.run(_main)


if __name__ == '__main__':
  main()

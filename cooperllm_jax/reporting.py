"""Per-round metrics of a federated run: metrics.jsonl, TensorBoard scalars and an accuracy plot.

metrics.jsonl is the record of a run (plots, comparisons and resuming read it back); TensorBoard
is for watching a run live; accuracy.png is the one-glance result.
"""

import json
import math
import numbers
import pathlib
import time

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator


def _finite(value):
  """value with every non-finite float (a diverged loss) as None: strict JSON has no NaN."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def to_json(value, **kwargs) -> str:
  """json.dumps that writes valid JSON: NaN and Infinity become null."""
  return json.dumps(_finite(value), allow_nan=False, **kwargs)


def read_metrics(path) -> list[dict]:
  """The rows of a metrics.jsonl, in the order they were written."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path, last_round: int) -> list[dict]:
  """Keeps the rows up to `last_round` (a resumed run continues after its checkpoint, so the rows a
  crashed run wrote after it would be duplicated); rewritten atomically. Returns the kept rows."""
  path = pathlib.Path(path)
  rows = []
  for line in path.read_text(encoding='utf-8').splitlines() if path.exists() else ():
    try:
      row = json.loads(line)
    except ValueError:  # a line cut short by a crash
      continue
    if row['round'] <= last_round:
      rows.append(row)
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(''.join(to_json(row) + '\n' for row in rows), encoding='utf-8')
  tmp.replace(path)
  return rows


# The x axes plot_accuracy can draw against: a metrics key and its label.
X_AXES = {'round': 'round', 'sim_time_s': 'simulated time (s)'}


def plot_accuracy(runs: dict[str, list[dict]], path, title: str, x: str = 'round',
                  target: float = None) -> None:
  """Test accuracy (and, where logged, train loss) against `x` (a key of X_AXES: round or
  simulated time) for named runs, one PNG; `target` adds a dashed accuracy line.

  Rows without a metric (accuracy is only measured on eval rounds, loss not at round 0) are left
  out of that curve. Draws on an Agg canvas, not pyplot, so no global backend or open window is
  involved and it is safe in headless jobs. A single run gets no legend (bar the target's): the
  title names it.
  """
  with_loss = any('train_loss' in row for rows in runs.values() for row in rows)
  fig = Figure(figsize=(7, 7 if with_loss else 4.5), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(2 if with_loss else 1, 1, sharex=True, squeeze=False)[:, 0]
  for ax, (key, label) in zip(axes, [('test_accuracy', 'test accuracy'),
                                     ('train_loss', 'train loss')]):
    for name, rows in runs.items():
      points = [(row[x], row[key]) for row in rows if row.get(key) is not None and x in row]
      # Markers keep a run with a single eval point visible.
      ax.plot([r for r, _ in points], [v for _, v in points], '.-', markersize=4, label=name)
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
  if target is not None:
    axes[0].axhline(target, color='gray', linestyle='--', linewidth=1, label=f'target {target:.3f}')
  if len(runs) > 1 or target is not None:
    axes[0].legend()
  axes[-1].set_xlabel(X_AXES[x])
  times = [row[x] for rows in runs.values() for row in rows if row.get(x, 0) > 0]
  if x == 'round':
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
  elif times and max(times) > 10 * min(times):
    # Runs whose rounds take 100x longer (BP vs ZO) would squash the others into the origin.
    axes[-1].set_xscale('symlog', linthresh=min(times))
    axes[-1].set_xlim(left=0)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


class MetricWriter:
  """Sink for one run's per-round rows: metrics.jsonl, TensorBoard (tb/) and accuracy.png on close.

  metrics.jsonl is opened for appending so that a resumed run continues the same file; each row
  is flushed as it is written so a crashed run keeps every finished round.
  """

  def __init__(self, workdir: pathlib.Path, title: str, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.title = title
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.metrics_path = self.workdir / 'metrics.jsonl'
    self._file = open(self.metrics_path, 'a', encoding='utf-8')
    if tensorboard:  # imported here: it imports torch, seconds of every run's (and error's) start
      import tensorboardX  # pylint: disable=g-import-not-at-top
    # tensorboardX names event files by the second and opens them with 'wb'; the suffix keeps a
    # writer reopened within the same second (a quick resume) from truncating the previous file.
    self._tb = (tensorboardX.SummaryWriter(str(self.workdir / 'tb'),
                                           filename_suffix=f'.{time.time_ns()}')
                if tensorboard else None)

  def write(self, row: dict) -> None:
    """Appends `row` (which must have an int 'round') to metrics.jsonl; numeric fields to TB."""
    self._file.write(to_json(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        # bool is an int subclass; lists (e.g. sampled clients) and strings are not scalars.
        if key != 'round' and isinstance(value, numbers.Real) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, global_step=row['round'])

  def close(self) -> None:
    """Closes the files and plots the whole metrics.jsonl, earlier runs' rows of a resume included."""
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    plot_accuracy({self.title: read_metrics(self.metrics_path)}, self.workdir / 'accuracy.png',
                  self.title)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class NullWriter:
  """MetricWriter's interface, writing nothing: processes other than 0 of a multi-process run,
  which compute every row alike, leave the files to process 0."""

  def write(self, row: dict) -> None:
    del row

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    return None


GANTT_COLORS = {'cloud': '#7b4fa0', 'link': '#4c9be0', 'compute': '#e0913c', 'edge': '#4ca05a'}


def plot_gantt(timelines: dict, path, title: str) -> None:
  """One panel per named timeline ({name: system.timeline.simulate's events}) with a row per
  resource and a bar per task, coloured by kind; shared time axis, so panels compare at a glance."""
  rows = []
  for events in timelines.values():
    for e in sorted(events.values(), key=lambda e: e.start):
      if e.task.resource not in rows:
        rows.append(e.task.resource)
  fig = Figure(figsize=(10, 1.2 + 0.32 * len(rows) * len(timelines)), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(timelines), 1, sharex=True, squeeze=False)[:, 0]
  for ax, (name, events) in zip(axes, timelines.items()):
    for e in events.values():
      y = rows.index(e.task.resource)
      ax.broken_barh([(e.start, max(e.end - e.start, 1e-9))], (y - 0.4, 0.8),
                     facecolors=GANTT_COLORS[e.task.kind], edgecolor='white', linewidth=0.3)
    end = max(e.arrival for e in events.values())
    ax.axvline(end, color='black', linewidth=1)
    ax.set_title(f'{name}: {end:.2f} s', fontsize=10)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.invert_yaxis()
    ax.grid(True, axis='x', alpha=0.3)
  axes[-1].set_xlabel('simulated time (s)')
  handles = [Rectangle((0, 0), 1, 1, color=c) for c in GANTT_COLORS.values()]
  axes[0].legend(handles, list(GANTT_COLORS), fontsize=7, loc='lower right', ncols=4)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)

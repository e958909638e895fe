"""Per-round metrics of a federated run: metrics.jsonl, TensorBoard scalars and an accuracy plot.

metrics.jsonl is the record of a run (plots, comparisons and resuming read it back); TensorBoard
is for watching a run live; accuracy.png is the one-glance result.
"""

import json
import numbers
import pathlib
import time

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import tensorboardX


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
  tmp.write_text(''.join(json.dumps(row) + '\n' for row in rows), encoding='utf-8')
  tmp.replace(path)
  return rows


def plot_accuracy(runs: dict[str, list[dict]], path, title: str) -> None:
  """Test accuracy (and, where logged, train loss) against round for named runs, one PNG.

  Rows without a metric (accuracy is only measured on eval rounds, loss not at round 0) are left
  out of that curve. Draws on an Agg canvas, not pyplot, so no global backend or open window is
  involved and it is safe in headless jobs. A single run gets no legend: the title names it.
  """
  with_loss = any('train_loss' in row for rows in runs.values() for row in rows)
  fig = Figure(figsize=(7, 7 if with_loss else 4.5), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(2 if with_loss else 1, 1, sharex=True, squeeze=False)[:, 0]
  for ax, (key, label) in zip(axes, [('test_accuracy', 'test accuracy'),
                                     ('train_loss', 'train loss')]):
    for name, rows in runs.items():
      points = [(row['round'], row[key]) for row in rows if key in row]
      # Markers keep a run with a single eval point visible.
      ax.plot([r for r, _ in points], [v for _, v in points], '.-', markersize=4, label=name)
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
  if len(runs) > 1:
    axes[0].legend()
  axes[-1].set_xlabel('round')
  axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
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
    # tensorboardX names event files by the second and opens them with 'wb'; the suffix keeps a
    # writer reopened within the same second (a quick resume) from truncating the previous file.
    self._tb = (tensorboardX.SummaryWriter(str(self.workdir / 'tb'),
                                           filename_suffix=f'.{time.time_ns()}')
                if tensorboard else None)

  def write(self, row: dict) -> None:
    """Appends `row` (which must have an int 'round') to metrics.jsonl; numeric fields to TB."""
    self._file.write(json.dumps(row) + '\n')
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

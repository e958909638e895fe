"""Per-round metrics of a federated run: metrics.jsonl, TensorBoard scalars and a per-run plot.

metrics.jsonl is the record of a run (plots, comparisons and resuming read it back) and keeps the
bare keys (test_accuracy, sim_time_s, ...); TensorBoard is for watching a run live and groups the
same scalars under train/, test/, comm/, sim/ and cloud/ (TB_GROUPS, the one place that maps keys
to tags); accuracy.png is the one-glance result. A write that fails (a full disk) raises an OSError
that names its file.
"""

import contextlib
import json
import math
import numbers
import pathlib
import time
from typing import Optional



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


@contextlib.contextmanager
def file_errors(path):
  """An OSError inside names `path` if it names no file (a write to a full disk's does not)."""
  try:
    yield
  except OSError as e:
    if e.filename is None:
      raise OSError(e.errno, e.strerror, str(path)) from e
    raise


def write_text(path, text: str) -> None:
  """Writes `path` whole or not at all: a temporary file beside it, renamed over it; a failed
  write (a full disk) names `path` and leaves the old file as it was."""
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.tmp')
  with file_errors(path):
    try:
      tmp.write_text(text, encoding='utf-8')
      tmp.replace(path)
    finally:
      tmp.unlink(missing_ok=True)


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
  write_text(path, ''.join(to_json(row) + '\n' for row in rows))
  return rows


# TensorBoard tag groups: what each run's metrics row holds, by topic. A key no group names (a new
# algorithm's own metric) is written under other/.
TB_GROUPS = {
    'train': ('train_loss', 'learning_rate', 'forwards', 'backwards', 'client_memory_bytes',
              'wall_s', 'dp_epsilon'),
    'test': ('test_accuracy', 'test_loss'),
    'comm': ('bytes_up', 'bytes_down', 'bytes_up_per_client', 'bytes_down_per_client',
             'guidance_rel_error', 'dropped', 'late', 'byzantine', 'rejected'),
    'sim': ('sim_round_s', 'sim_time_s'),
    'cloud': ('alpha', 'basis_rank', 'cloud_step_v', 'grad_sq', 'grad_sq_se', 'proj_sq',
              'proj_sq_se', 'proj_sq_weight', 'grad_sq_weight', 'cloud_share', 'cloud_tau_sq',
              'cloud_curvature', 'cloud_line_step', 'lr_v', 'cloud_trace', 'plain_share'),
}
_TB_TAGS = {key: f'{group}/{key}' for group, keys in TB_GROUPS.items() for key in keys}


def tb_tag(key: str) -> str:
  """The TensorBoard tag of a metrics key, e.g. 'test_accuracy' -> 'test/test_accuracy'."""
  return _TB_TAGS.get(key, f'other/{key}')


# The x axes the plots draw against: a metrics key and its label (bytes_per_client is derived:
# with_bytes_moved).
X_AXES = {'round': 'round', 'sim_time_s': 'simulated time (s)',
          'bytes_per_client': 'bytes per client, up + down, so far'}


def _figure(**kwargs):
  """A matplotlib Figure on the Agg canvas. matplotlib is imported at the first plot, not with the
  package, so the CLI (and its --help) starts without it."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def _integer_ticks():
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  return MaxNLocator(integer=True)


def _curve(ax, rows: list[dict], x: str, key: str, **kwargs) -> None:
  """key against x over the rows that have both (accuracy is only measured on eval rounds, loss
  not at round 0); markers keep a curve with a single point visible."""
  points = [(row[x], row[key]) for row in rows if row.get(key) is not None and x in row]
  ax.plot([p for p, _ in points], [v for _, v in points], '.-', markersize=4, **kwargs)


def _wide_axis(ax, runs, x: str = 'sim_time_s') -> None:
  """The x axis of `x` (simulated time, bytes) on a symlog scale where its values differ 10x
  (BP vs ZO rounds), which would squash the smaller runs into the origin on a linear one."""
  values = [row[x] for rows in runs for row in rows if row.get(x, 0) > 0]
  if values and max(values) > 10 * min(values):
    ax.set_xscale('symlog', linthresh=min(values))
    ax.set_xlim(left=0)


def with_bytes_moved(rows: list[dict]) -> list[dict]:
  """The rows, each with 'bytes_per_client': the bytes a client sent and received on average
  in the rounds so far (0 at round 0)."""
  total, out = 0.0, []
  for row in rows:
    total += row.get('bytes_up_per_client', 0) + row.get('bytes_down_per_client', 0)
    out.append(dict(row, bytes_per_client=total))
  return out


def plot_accuracy(runs: dict[str, list[dict]], path, title: str, x: str = 'round',
                  target: Optional[float] = None) -> None:
  """Test accuracy (and, where logged, train loss) against `x` (a key of X_AXES: round or
  simulated time) for named runs, one PNG; `target` adds a dashed accuracy line.

  Draws on an Agg canvas, not pyplot, so no global backend or open window is involved and it is
  safe in headless jobs. A single run gets no legend (bar the target's): the title names it.
  """
  with_loss = any('train_loss' in row for rows in runs.values() for row in rows)
  fig = _figure(figsize=(7, 7 if with_loss else 4.5), layout='constrained')
  axes = fig.subplots(2 if with_loss else 1, 1, sharex=True, squeeze=False)[:, 0]
  for ax, (key, label) in zip(axes, [('test_accuracy', 'test accuracy'),
                                     ('train_loss', 'train loss')]):
    for name, rows in runs.items():
      _curve(ax, rows, x, key, label=name)
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
  if target is not None:
    axes[0].axhline(target, color='gray', linestyle='--', linewidth=1, label=f'target {target:.3f}')
  if len(runs) > 1 or target is not None:
    axes[0].legend()
  axes[-1].set_xlabel(X_AXES[x])
  if x == 'round':
    axes[-1].xaxis.set_major_locator(_integer_ticks())
  else:
    _wide_axis(axes[-1], runs.values(), x)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


def plot_run(rows: list[dict], path, title: str, chance: Optional[float] = None) -> None:
  """One run at a glance, four panels: test accuracy against rounds and against simulated time
  (with `chance`, the majority-class rate of the test split, as a dotted line), train loss, and
  the bytes each client sent and received per round (log scale: uplinks of scalars are 1e4-1e7
  times smaller than dense ones)."""
  fig = _figure(figsize=(11, 7), layout='constrained')
  (acc_r, acc_t), (loss, comm) = fig.subplots(2, 2)
  for ax, x in ((acc_r, 'round'), (acc_t, 'sim_time_s')):
    _curve(ax, rows, x, 'test_accuracy', label='test accuracy')
    if chance is not None:
      ax.axhline(chance, color='gray', linestyle=':', linewidth=1,
                 label=f'chance: majority class ({chance:.3f})')
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel('test accuracy')
  acc_r.legend(loc='lower right')
  _curve(loss, rows, 'round', 'train_loss')
  loss.set_ylabel('train loss')
  for key, label in (('bytes_up_per_client', 'up'), ('bytes_down_per_client', 'down')):
    _curve(comm, rows, 'round', key, label=label)
  comm.set_ylabel('bytes per client')
  if any(row.get('bytes_down_per_client') or row.get('bytes_up_per_client') for row in rows):
    comm.set_yscale('log')
  comm.legend(loc='best')
  for ax in (acc_r, loss, comm):
    ax.set_xlabel('round')
    ax.xaxis.set_major_locator(_integer_ticks())
  for ax in (acc_r, acc_t, loss, comm):
    ax.grid(True, alpha=0.3)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


def plot_comparison(runs: dict[str, list[dict]], path, title: str) -> None:
  """Several runs overlaid, four panels: test accuracy against rounds, simulated time and the
  bytes each client moved, and the learning rate each round ran at (log scale) with the divergence
  guard's rollbacks marked x."""
  runs = {name: with_bytes_moved(rows) for name, rows in runs.items()}
  fig = _figure(figsize=(12, 8), layout='constrained')
  (by_round, by_time), (by_bytes, rate) = fig.subplots(2, 2)
  for ax, x in ((by_round, 'round'), (by_time, 'sim_time_s'), (by_bytes, 'bytes_per_client')):
    for name, rows in runs.items():
      _curve(ax, rows, x, 'test_accuracy', label=name)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel('test accuracy')
    ax.grid(True, alpha=0.3)
    if x != 'round':
      _wide_axis(ax, runs.values(), x)
  for name, rows in runs.items():
    _curve(rate, rows, 'round', 'learning_rate', label=name)
    back = [(row['round'], row['learning_rate']) for row in rows
            if row.get('rollback') and 'learning_rate' in row]
    rate.plot([r for r, _ in back], [lr for _, lr in back], 'x', color='black', markersize=8)
  rate.plot([], [], 'x', color='black', label='rollback (the rate halves after it)')
  if any(row.get('learning_rate', 0) > 0 for rows in runs.values() for row in rows):
    rate.set_yscale('log')
  rate.set_xlabel('round')
  rate.set_ylabel('learning rate')
  rate.grid(True, alpha=0.3)
  rate.legend(loc='best', fontsize=8)
  for ax in (by_round, rate):
    ax.xaxis.set_major_locator(_integer_ticks())
  by_round.legend(loc='lower right', fontsize=8)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


class _Events:
  """A TensorBoard event file in `directory`, written in the caller's thread and flushed with each
  row: tensorboardX's SummaryWriter writes from a thread of its own and flushes again at exit, so
  a disk that filled up would print tracebacks after the run's error."""

  def __init__(self, directory: pathlib.Path):
    # Imported here: tensorboardX imports torch, seconds of every run's (and error's) start.
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
    self.directory = directory
    directory.mkdir(exist_ok=True)
    # The file is named by the second and opened with 'wb'; the suffix keeps a writer reopened
    # within the same second (a quick resume) from truncating the previous file.
    self._writer = EventsWriter(str(directory / 'events'), f'.{time.time_ns()}')

  def write(self, row: dict) -> None:
    """The row's numeric fields, tagged by tb_tag, at step row['round']."""
    # pylint: disable=g-import-not-at-top
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar
    for key, value in row.items():
      # bool is an int subclass; lists (e.g. sampled clients) and strings are not scalars.
      if key != 'round' and isinstance(value, numbers.Real) and not isinstance(value, bool):
        self._writer.write_event(Event(wall_time=time.time(), step=row['round'],
                                       summary=scalar(tb_tag(key), value)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricWriter:
  """Sink for one run's per-round rows: metrics.jsonl, TensorBoard (tb/) and accuracy.png on close
  (plot_run; `chance` is its chance line).

  metrics.jsonl is opened for appending so that a resumed run continues the same file; each row
  is flushed as it is written so a crashed run keeps every finished round. Leaving the `with` on
  an error still closes and plots what it can, quietly: the run's own error is the one reported.
  """

  def __init__(self, workdir: pathlib.Path, title: str, tensorboard: bool = True,
               chance: Optional[float] = None):
    self.workdir = pathlib.Path(workdir)
    self.title, self.chance = title, chance
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.metrics_path = self.workdir / 'metrics.jsonl'
    self._file = open(self.metrics_path, 'a', encoding='utf-8')
    self._tb = _Events(self.workdir / 'tb') if tensorboard else None

  def write(self, row: dict) -> None:
    """Appends `row` (which must have an int 'round') to metrics.jsonl; numeric fields to TB,
    tagged by tb_tag."""
    with file_errors(self.metrics_path):
      self._file.write(to_json(row) + '\n')
      self._file.flush()
    if self._tb is not None:
      with file_errors(self._tb.directory):
        self._tb.write(row)

  def _plot(self) -> None:
    plot_run(read_metrics(self.metrics_path), self.workdir / 'accuracy.png', self.title,
             self.chance)

  def close(self) -> None:
    """Closes the files and plots the whole metrics.jsonl, earlier runs' rows of a resume
    included; each step is tried, and the first that failed is raised."""
    steps = [(self._file.close, self.metrics_path), (self._plot, self.workdir / 'accuracy.png')]
    if self._tb is not None:
      steps.insert(1, (self._tb.close, self._tb.directory))
    failed = None
    for step, path in steps:
      try:
        with file_errors(path):
          step()
      except OSError as e:
        failed = failed or e
    if failed is not None:
      raise failed

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback):
    if exc is None:
      self.close()
    else:
      with contextlib.suppress(OSError):
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
  fig = _figure(figsize=(10, 1.2 + 0.32 * len(rows) * len(timelines)), layout='constrained')
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
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  handles = [Rectangle((0, 0), 1, 1, color=c) for c in GANTT_COLORS.values()]
  axes[0].legend(handles, list(GANTT_COLORS), fontsize=7, loc='lower right', ncols=4)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)

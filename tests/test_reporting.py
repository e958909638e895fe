"""MetricWriter: JSONL round trip, TensorBoard scalars, PNG plot, and append-on-reopen for resumes."""

import json
import pathlib
import struct

import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from cooperllm_jax.reporting import (TB_GROUPS, MetricWriter, plot_accuracy, plot_run,
                                     read_metrics, tb_tag)

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

ROWS = [
    {'round': 0, 'test_accuracy': 0.2, 'test_loss': 1.6},
    {'round': 1, 'train_loss': 1.5, 'bytes_up': 4096, 'bytes_down': 8192, 'forwards': 20,
     'backwards': 0, 'wall_s': 0.25, 'client_memory_bytes': 123456789, 'clients': [3, 1],
     'note': 'warmup', 'resumed': False},
    {'round': 2, 'train_loss': 1.25, 'bytes_up': 4096, 'bytes_down': 0, 'forwards': 20,
     'backwards': 0, 'wall_s': 0.5, 'client_memory_bytes': 123456789, 'clients': [0, 2],
     'test_accuracy': 0.5, 'test_loss': 1.1},
]
NUMERIC_TAGS = {'test/test_accuracy', 'test/test_loss', 'train/train_loss', 'comm/bytes_up',
                'comm/bytes_down', 'train/forwards', 'train/backwards', 'train/wall_s',
                'train/client_memory_bytes'}


def read_scalars(tb_dir) -> list[tuple[str, int, float]]:
  """(tag, step, value) from every event file under tb_dir, parsed from the TFRecord framing.

  The `tensorboard` package (and its event reader) is not installed, so records are read by hand:
  u64 length, u32 masked CRC of the length, payload, u32 masked CRC of the payload.
  """
  scalars = []
  for path in sorted(tb_dir.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack('<Q', header)
      assert struct.unpack('<I', data[pos + 8:pos + 12])[0] == masked_crc32c(header)
      payload = data[pos + 12:pos + 12 + length]
      assert struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])[0] == \
          masked_crc32c(payload)
      pos += 16 + length
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


def assert_png(path):
  assert path.stat().st_size > 0
  assert path.read_bytes()[:8] == _PNG_MAGIC


def test_rows_round_trip_and_plot(tmp_path):
  with MetricWriter(tmp_path, title='fedavg on demo') as writer:
    for row in ROWS:
      writer.write(row)
    # Flushed per row: readable before close.
    assert read_metrics(tmp_path / 'metrics.jsonl') == ROWS
  assert read_metrics(tmp_path / 'metrics.jsonl') == ROWS
  assert_png(tmp_path / 'accuracy.png')


def test_non_finite_values_are_written_as_null(tmp_path):
  """metrics.jsonl stays strict JSON (no NaN or Infinity literals) when a loss diverges."""
  with MetricWriter(tmp_path, title='diverged', tensorboard=False) as writer:
    writer.write({'round': 1, 'train_loss': float('nan'), 'extra': [float('inf'), 1.0]})
  line = (tmp_path / 'metrics.jsonl').read_text()
  assert json.loads(line, parse_constant=pytest.fail) == {'round': 1, 'train_loss': None,
                                                          'extra': [None, 1.0]}


def test_tensorboard_gets_numeric_scalars_only(tmp_path):
  with MetricWriter(tmp_path, title='t') as writer:
    for row in ROWS:
      writer.write(row)
  assert list((tmp_path / 'tb').glob('events.out.tfevents.*'))
  scalars = read_scalars(tmp_path / 'tb')
  assert {tag for tag, _, _ in scalars} == NUMERIC_TAGS  # no clients, note, resumed, round
  expected = sorted((tb_tag(k), row['round'], v) for row in ROWS for k, v in row.items()
                    if tb_tag(k) in NUMERIC_TAGS)
  got = sorted(scalars)
  assert [(tag, step) for tag, step, _ in got] == [(tag, step) for tag, step, _ in expected]
  # TensorBoard stores float32; compare at that precision.
  assert [v for _, _, v in got] == pytest.approx([v for _, _, v in expected], rel=1e-6)
  # The non-numeric fields are still in the JSONL.
  assert read_metrics(tmp_path / 'metrics.jsonl')[1]['clients'] == [3, 1]
  assert read_metrics(tmp_path / 'metrics.jsonl')[1]['note'] == 'warmup'


def test_reopen_appends(tmp_path):
  with MetricWriter(tmp_path, title='t') as writer:
    writer.write(ROWS[0])
    writer.write(ROWS[1])
  with MetricWriter(tmp_path, title='t') as writer:
    writer.write(ROWS[2])
  assert read_metrics(tmp_path / 'metrics.jsonl') == ROWS
  # Reopened within the same second: the first event file must survive alongside the second.
  assert len(list((tmp_path / 'tb').glob('events.out.tfevents.*'))) == 2
  assert {step for _, step, _ in read_scalars(tmp_path / 'tb')} == {0, 1, 2}
  assert_png(tmp_path / 'accuracy.png')


def test_without_tensorboard(tmp_path):
  with MetricWriter(tmp_path / 'run', title='t', tensorboard=False) as writer:
    writer.write(ROWS[0])
  assert not (tmp_path / 'run' / 'tb').exists()
  assert read_metrics(tmp_path / 'run' / 'metrics.jsonl') == ROWS[:1]
  assert_png(tmp_path / 'run' / 'accuracy.png')


def test_closes_and_plots_when_run_raises(tmp_path):
  with pytest.raises(RuntimeError):
    with MetricWriter(tmp_path, title='t') as writer:
      writer.write(ROWS[0])
      raise RuntimeError('round failed')
  assert read_metrics(tmp_path / 'metrics.jsonl') == ROWS[:1]
  assert_png(tmp_path / 'accuracy.png')


def test_plot_accuracy_several_runs(tmp_path):
  runs = {'fedavg': ROWS, 'accuracy only': [ROWS[0], {'round': 2, 'test_accuracy': 0.4}]}
  plot_accuracy(runs, tmp_path / 'compare.png', 'comparison')
  assert_png(tmp_path / 'compare.png')


def test_plot_accuracy_against_simulated_time_with_target(tmp_path):
  timed = [{**row, 'sim_time_s': 12.5 * row['round']} for row in ROWS]
  plot_accuracy({'timed': timed, 'untimed rows are skipped': ROWS}, tmp_path / 'time.png',
                'vs simulated time', x='sim_time_s', target=0.45)
  assert_png(tmp_path / 'time.png')


def test_tensorboard_tags_are_grouped_and_jsonl_keys_stay_bare(tmp_path):
  with MetricWriter(tmp_path, title='t') as writer:
    writer.write({'round': 1, 'sim_time_s': 2.0, 'alpha': 0.5, 'my_metric': 3.0})
  assert {tag for tag, _, _ in read_scalars(tmp_path / 'tb')} == {
      'sim/sim_time_s', 'cloud/alpha', 'other/my_metric'}
  assert read_metrics(tmp_path / 'metrics.jsonl') == [
      {'round': 1, 'sim_time_s': 2.0, 'alpha': 0.5, 'my_metric': 3.0}]
  # Each key has one group: a key listed twice would get whichever group came last.
  keys = [k for group in TB_GROUPS.values() for k in group]
  assert len(keys) == len(set(keys))


def test_plot_run_with_chance_line_time_axis_and_bytes(tmp_path):
  timed = [{**row, 'sim_time_s': 0.4 * row['round'], 'bytes_up_per_client': 36.0,
            'bytes_down_per_client': 15019.0} for row in ROWS]
  plot_run(timed, tmp_path / 'run.png', 'cooperllm on demo', chance=0.229)
  assert_png(tmp_path / 'run.png')
  plot_run(ROWS[:1], tmp_path / 'first.png', 'before any round')   # round 0 only, no chance
  assert_png(tmp_path / 'first.png')


def test_a_failed_write_names_its_file_and_keeps_the_old_one(tmp_path, monkeypatch):
  """A full disk's OSError names no file: write_text's names it, leaves the file it replaces as it
  was and no temporary file behind."""
  from cooperllm_jax import reporting  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'summary.json'
  path.write_text('old')
  def full(self, text, encoding=None):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(pathlib.Path, 'write_text', full)
  with pytest.raises(OSError) as e:
    reporting.write_text(path, 'new')
  assert (e.value.errno, e.value.filename) == (28, str(path))
  monkeypatch.undo()
  assert path.read_text() == 'old' and sorted(p.name for p in tmp_path.iterdir()) == ['summary.json']


class _FullFile:
  """A metrics file on a full disk: every write and close fails like the OS's, naming no file."""

  def write(self, text):
    raise OSError(28, 'No space left on device')

  flush = close = lambda self: self.write('')


def test_a_run_that_fails_is_the_error_reported_and_a_full_disk_names_the_file(tmp_path):
  """Leaving the writer on the run's own error raises that error, though closing fails too; a row
  that cannot be written names metrics.jsonl."""
  with pytest.raises(RuntimeError, match='round failed'):
    with MetricWriter(tmp_path, title='t') as writer:
      writer._file.close()
      writer._file = _FullFile()
      raise RuntimeError('round failed')
  with pytest.raises(OSError) as e:
    with MetricWriter(tmp_path, title='t') as writer:
      writer._file.close()
      writer._file = _FullFile()
      writer.write(ROWS[0])
  assert e.value.filename == str(tmp_path / 'metrics.jsonl')

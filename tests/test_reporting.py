"""MetricWriter: JSONL round trip, TensorBoard scalars, PNG plot, and append-on-reopen for resumes."""

import json
import struct

import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from cooperllm_jax.reporting import MetricWriter, plot_accuracy, read_metrics

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
NUMERIC_TAGS = {'test_accuracy', 'test_loss', 'train_loss', 'bytes_up', 'bytes_down', 'forwards',
                'backwards', 'wall_s', 'client_memory_bytes'}


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
  expected = sorted((k, row['round'], v) for row in ROWS for k, v in row.items()
                    if k in NUMERIC_TAGS)
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

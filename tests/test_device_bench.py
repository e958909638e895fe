"""experiments/bench/device.py, the one-shot GPU/TPU run, in its --smoke mode on CPU: every section
runs and lands in the report, so the script a device owner runs once has not rotted."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_script_smoke(tmp_path):
  out = tmp_path / 'device.json'
  proc = subprocess.run([sys.executable, '-m', 'experiments.bench.device', '--smoke',
                         f'--out={out}'], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['smoke'] and report['env']['backend'] == 'cpu'
  assert report['kernel_tests']['returncode'] == 0, report['kernel_tests']
  for layout in ('rows', 'flat'):
    kernel = report['kernel'][layout]
    assert kernel['z_bit_equal'], kernel  # interpreted on CPU: the reference's bits
    for fmt in ('float32', 'int8', 'int4'):
      assert kernel[fmt]['max_abs_diff'] < 1e-5 and kernel[fmt]['fused']['median_s'] > 0, kernel
  step = report['zo_step']['lora']['pallas']  # the client's forward through the fused kernel
  assert step['time_over_forward'] > 0 and step['memory']['peak_bytes'] > 0, step
  (clients,) = report['clients']['pallas']
  assert clients['clients'] == 2 and clients['client_steps_per_s'] > 0, clients
  assert set(report['device_memory']) == {'kernel_tests', 'kernel', 'zo_step', 'clients'}
  assert all(v is None for v in report['device_memory'].values())  # CPU keeps no memory_stats

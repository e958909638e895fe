r"""One run on a GPU or TPU host: what CPU CI cannot measure, written to one JSON file.

  pip install '.[cuda]'        # or '.[tpu]' on a TPU VM (docs/scaling.md)
  python -m experiments.bench.device    # -> experiments/results/device_<platform>.json
  python -m experiments.bench.device --smoke --out=/tmp/device.json  # CPU, tiny sizes

Report sections:
  kernel_tests   pytest tests/test_kernels.py -k Compiled: the fused kernel compiled (Triton on a
                 GPU, Mosaic on a TPU) against its reference; on CPU that class skips;
  kernel         per layout ('rows', 'flat') and weight format (float32, int8, packed int4) of a
                 [384, 1536] weight with 2 basis vectors: fused_perturb against the XLA
                 perturbation (fused_perturb_reference, jitted): whether z is bit-equal (h = a = 1,
                 b = 0 on zeros), the largest difference of the whole output, seconds per call;
  zo_step        seconds and XLA's memory plan of one ZO-SGD step (per --impls and --subsets:
                 perturb_impl 'xla' and 'pallas', trainable 'full' and 'lora'; threefry Gaussian
                 directions, which the kernel draws) against one forward pass;
  clients        client-steps per second at --clients clients a round, per perturb_impl
                 (bench/client_throughput.py's bench_clients and its flags: --model, --chunk,
                 --local_steps, --batch, --seq, --rounds, ...; here 20, 100, 1000 clients, LoRA,
                 one local step);
  device_memory  the device's memory_stats after each section: bytes in use and the peak so far
                 (the process's, compiles and all); None where the backend keeps none (CPU);
  seconds        each section's wall time, compiles included.
The models have the real models' shapes with random weights (bench/common.MODEL_SHAPES): speed and
memory do not depend on the values, and no model files are needed on the device host. --smoke
swaps in a tiny encoder, a small kernel weight, 2 clients, perturb_impl 'pallas' alone and one
fast kernel test (SMOKE), so that tests/test_device_bench.py runs the whole script on CPU.
"""

import functools
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import zoo
from cooperllm_jax.federated.algorithms import make_algorithm
from cooperllm_jax.kernels.fused_perturb import LAYOUTS, fused_perturb, fused_perturb_reference
from cooperllm_jax.memory import memory_of
from cooperllm_jax.models import Encoder, EncoderConfig
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo import keys as keys_lib
from cooperllm_jax.zoo.quantized import quantize
from experiments.bench import client_throughput
from experiments.bench import common

FLAGS = flags.FLAGS
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny sizes everywhere, for a CPU check of the script.')
_OUT = flags.DEFINE_string('out', None, 'The JSON report (default: '
                           'experiments/results/device_<platform>.json).')
_KERNEL_TESTS = flags.DEFINE_string('kernel_tests', 'Compiled',
                                    'pytest -k expression for tests/test_kernels.py.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per kernel and ZO step, after a '
                                'warm-up.')
_IMPLS = flags.DEFINE_list('impls', ['xla', 'pallas'], 'perturb_impl values to time.')
_SUBSETS = flags.DEFINE_list('subsets', ['full', 'lora'], 'Trainable subsets of the ZO step.')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS, LR = 1e-3, 1e-5
GAUSSIAN = 'gaussian'  # the fused kernel draws threefry Gaussians: every impl here draws them
# What --smoke changes, unless given on the command line.
SMOKE = {'clients': ['2'], 'chunk': 2, 'local_steps': 1, 'batch': 2, 'seq': 8, 'rounds': 1,
         'repeats': 1, 'subsets': ['lora'], 'impls': ['pallas'], 'kernel_tests': 'flat_index'}
TINY = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                     max_positions=16, num_labels=common.NUM_LABELS, type_vocab_size=0,
                     pooling='mean')


def device_memory():
  """Bytes and peak bytes in use on the first device (None where the backend keeps no stats)."""
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: stats[k] for k in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit') if k in stats}


def kernel_tests():
  """pytest on tests/test_kernels.py -k --kernel_tests, in a subprocess: exit code and summary."""
  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k',
                         _KERNEL_TESTS.value, 'tests/test_kernels.py'], cwd=REPO,
                        capture_output=True, text=True, check=False)
  lines = proc.stdout.strip().splitlines()
  return {'select': _KERNEL_TESTS.value, 'returncode': proc.returncode,
          'summary': lines[-1] if lines else proc.stderr[-2000:]}


FORMATS = ('float32', 'int8', 'int4')


def _kernel_inputs(fmt: str, rows: int, cols: int, m: int = 2):
  """(w, basis, formats, blocks) of fused_perturb for a weight format: formats are the keyword
  arguments the reference takes too, blocks the kernel's own (packed int4 needs cols / 2 in whole
  blocks: 256 columns)."""
  x, v = (jax.random.normal(jax.random.key(s), shape) for s, shape in
          ((1, (rows, cols)), (2, (m, rows, cols))))
  if fmt == 'float32':
    return x, v, {}, {}
  bits = 4 if fmt == 'int4' else 8
  w, basis = (quantize(a, 32, bits=bits, pack=bits == 4) for a in (x, v))
  formats = dict(w_scales=w.scales, w_group=32, w_packed=w.packed, basis_scales=basis.scales,
                 basis_group=32, basis_packed=basis.packed)
  return w.values, basis.values, formats, {'block_cols': 256} if bits == 4 else {}


def _z_bit_equal(leaf, shape, layout) -> bool:
  """Whether the kernel's z (h = a = 1, b = 0 on zeros) has jax.random.normal's bits."""
  zeros = jnp.zeros(shape, jnp.float32)
  z = [jax.jit(functools.partial(f, layout=layout))(zeros, leaf, 1.0, 1.0, 0.0)
       for f in (fused_perturb, fused_perturb_reference)]
  return bool(np.array_equal(*(np.asarray(a).view(np.uint32) for a in z)))


def _fused_vs_xla(leaf, layout, w, basis, formats, blocks, u) -> dict:
  """The fused kernel and the XLA perturbation on the same inputs: equality and seconds per call."""
  fns = {'fused': functools.partial(fused_perturb, **blocks), 'xla': fused_perturb_reference}
  calls = {name: jax.jit(lambda w, v, u, f=f: f(w, leaf, 0.05, 0.8, 0.6, v, u, layout=layout,
                                                **formats))
           for name, f in fns.items()}
  got, want = (f(w, basis, u) for f in calls.values())
  times = common.timed({name: (lambda _, f=f: f(w, basis, u), None)
                        for name, f in calls.items()}, _REPEATS.value)
  return {'bit_equal': bool(np.array_equal(got, want)),
          'max_abs_diff': float(jnp.abs(got - want).max()),
          **{name: common.summary(t) for name, t in times.items()}}


def kernel_vs_xla():
  """The fused kernel against the XLA perturbation, per layout and weight format."""
  rows, cols = (40, 512) if _SMOKE.value else (384, 1536)
  leaf = keys_lib.leaf_key(keys_lib.address_key(7, (1, 0, 0, 0)), 'layers/mlp/up/kernel')
  u = jnp.array([0.3, -0.2], jnp.float32)
  out = {'shape': [rows, cols], 'basis': 2}
  for layout in LAYOUTS:
    out[layout] = {'z_bit_equal': _z_bit_equal(leaf, (rows, cols), layout)}
    for fmt in FORMATS:
      r = out[layout][fmt] = _fused_vs_xla(leaf, layout, *_kernel_inputs(fmt, rows, cols), u)
      common.log(f'  kernel {layout} {fmt}: fused {r["fused"]["median_s"]:.2e} s, '
                 f'xla {r["xla"]["median_s"]:.2e} s, max |diff| {r["max_abs_diff"]:.1e}')
  return out


def _prepared(fn, *args, state=0):
  """(XLA's memory plan, (call, initial state)) of fn(*args) compiled with its first `state`
  arguments donated (the outputs that replace them come first), for common.timed."""
  compiled = jax.jit(fn, donate_argnums=tuple(range(state))).lower(*args).compile()
  init = tuple(jax.tree.map(jnp.copy, a) for a in args[:state])
  call = lambda s: tuple(compiled(*s, *args[state:])[:state]) if state else compiled(*args)
  return memory_of(compiled), (call, init)


def zo_step_vs_forward(model, params):
  """One ZO-SGD step per trainable subset and perturb_impl against one forward pass."""
  loss = make_loss(model)
  batch = common.synthetic_batch(model.cfg.vocab_size, (FLAGS.batch,), FLAGS.seq)
  memory, calls = {}, {}
  memory['forward'], calls['forward'] = _prepared(loss, params, batch)
  probes = jnp.arange(FLAGS.probes, dtype=jnp.int32)
  zeros = jnp.zeros_like(probes)
  keys = zoo.address_keys(0, jnp.stack([zeros + 1, zeros, zeros, probes], -1))
  for mode in _SUBSETS.value:
    subset = zoo.Subset(mode)
    trainable, frozen = subset.split(params, jax.random.key(0))
    for impl in _IMPLS.value:
      est = zoo.Estimator(eps=EPS, probes=FLAGS.probes, distribution=GAUSSIAN,
                          perturb_impl=impl)
      memory[mode, impl], calls[mode, impl] = _prepared(
          zoo.make_zo_step(loss, est, subset), trainable, frozen, batch, keys, jnp.float32(LR),
          state=1)
  times = common.timed(calls, _REPEATS.value)
  forward = common.summary(times['forward'])
  out = {'forward': {'time': forward, 'memory': memory['forward']}}
  for (mode, impl), t in ((k, times[k]) for k in calls if k != 'forward'):
    r = {'time': common.summary(t), 'memory': memory[mode, impl]}
    r.update(time_over_forward=r['time']['median_s'] / forward['median_s'],
             peak_over_forward=memory[mode, impl]['peak_bytes'] / memory['forward']['peak_bytes'])
    out.setdefault(mode, {})[impl] = r
    common.log(f'  zo_step {mode} {impl}: {r["time"]["median_s"]:.3f} s '
               f'({r["time_over_forward"]:.2f}x forward)')
  return out


def clients(model, params):
  """client_throughput's bench_clients at each --clients count, per perturb_impl."""
  out = {}
  for impl in _IMPLS.value:
    cfg = client_throughput.config()
    cfg.zo.perturb_impl, cfg.zo.distribution = impl, GAUSSIAN
    alg = make_algorithm(cfg, model)
    out[impl] = [client_throughput.bench_clients(alg, params, model.cfg.vocab_size, int(c))
                 for c in FLAGS.clients]
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _SMOKE.value:
    for name, value in SMOKE.items():
      FLAGS.set_default(name, value)
  elif FLAGS.model not in common.MODEL_SHAPES:
    raise app.UsageError(f'--model must be one of {", ".join(common.MODEL_SHAPES)}')
  # First, in a subprocess, while this process holds no device (a TPU takes one process at a time,
  # and a GPU's memory would be preallocated here).
  start = time.perf_counter()
  tests = kernel_tests()
  seconds = {'kernel_tests': time.perf_counter() - start}
  model = Encoder(TINY) if _SMOKE.value else common.MODEL_SHAPES[FLAGS.model]()
  params = model.init(jax.random.key(0))
  report = {'benchmark': 'device', 'env': common.environment(), 'smoke': _SMOKE.value,
            'config': {'model': 'tiny encoder' if _SMOKE.value else FLAGS.model,
                       'batch': FLAGS.batch, 'seq': FLAGS.seq, 'probes': FLAGS.probes,
                       'repeats': _REPEATS.value, 'impls': _IMPLS.value,
                       'subsets': _SUBSETS.value,
                       'clients': [int(c) for c in FLAGS.clients], 'chunk': FLAGS.chunk,
                       'local_steps': FLAGS.local_steps, 'trainable': FLAGS.trainable},
            'kernel_tests': tests, 'seconds': seconds,
            'device_memory': {'kernel_tests': device_memory()}}
  sections = {'kernel': kernel_vs_xla,
              'zo_step': lambda: zo_step_vs_forward(model, params),
              'clients': lambda: clients(model, params)}
  for name, run in sections.items():
    common.log(name)
    start = time.perf_counter()
    report[name] = run()
    seconds[name] = time.perf_counter() - start
    report['device_memory'][name] = device_memory()
  report['env']['loadavg_end'] = common.environment()['loadavg']
  out = _OUT.value or os.path.join(REPO, 'experiments', 'results',
                                   f'device_{jax.default_backend()}.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    f.write(json.dumps(report, indent=1) + '\n')
  common.log(f'wrote {out}')


# This run's defaults for client_throughput's flags: 20, 100 and 1000 clients a round, LoRA, one
# local step, one timed round.
DEVICE_DEFAULTS = {'clients': ['20', '100', '1000'], 'trainable': 'lora', 'local_steps': 1,
                   'rounds': 1}

if __name__ == '__main__':
  for flag, default in DEVICE_DEFAULTS.items():
    FLAGS.set_default(flag, default)
  app.run(main)

r"""Round latency of CooperLLM on the device profiles: sequential vs SPC pipelining, without and
with DTC, from the real models' per-layer FLOPs and guidance bytes; a Gantt chart of one round.

  python -m experiments.spc --workdir=experiments/results/spc

For every model (abstract shapes: nothing is loaded or allocated), trainable subset and client
profile: one FedSGD round (--steps local steps of --batch x --seq tokens, one central probe) of
--clients_per_round clients of that profile, the edge server and the cloud GPU
(cooperllm_jax/system/profiles.json, or --profiles). The cloud's backprop is lagged (cloud.lag=1:
it runs during the previous round). Guidance V (m = --pool) is sent as float32 without DTC; with
DTC, each stage in the most precise format whose transfer hides behind the client's compute of
that stage (timeline.dtc_formats). Writes table.md, results.json and gantt.png (the round named by
--gantt) to --workdir.
"""

import dataclasses
import json
import pathlib
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import zoo
from cooperllm_jax.errors import CooperError
from cooperllm_jax.reporting import plot_gantt
from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.system import profiles as profiles_lib
from cooperllm_jax.system import timeline as tl
from cooperllm_jax.system import workload as wl
from cooperllm_jax.system.clock import SimulatedClock
from experiments.bench import common

_WORKDIR = flags.DEFINE_string('workdir', 'experiments/results/spc', 'Output directory.')
_MODELS = flags.DEFINE_list('models', ['minilm', 'smollm2', 'llama1b'],
                            f'Of {", ".join(common.MODEL_SHAPES)}.')
_SUBSETS = flags.DEFINE_list('subsets', ['full', 'lora', 'head'],
                             'Trainable subsets (zoo.Subset modes).')
_CLIENTS = flags.DEFINE_list('clients', ['phone_midrange', 'phone_flagship', 'jetson_orin_nano'],
                             'End-device profiles (one row each).')
_PER_ROUND = flags.DEFINE_integer('clients_per_round', 4, 'Clients per round.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Examples per local step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per example.')
_STEPS = flags.DEFINE_integer('steps', 1, 'Local steps (1: FedSGD, the paper\'s setting).')
_POOL = flags.DEFINE_integer('pool', 1, 'm: guidance directions.')
_PROFILES = flags.DEFINE_string('profiles', '', 'Device-profile JSON (default: the packaged one).')
_GANTT = flags.DEFINE_list('gantt', ['smollm2', 'lora', 'jetson_orin_nano'],
                           'model,subset,client of the round drawn in gantt.png.')


def trainable_shapes(model, mode: str):
  """The trainable subset as ShapeDtypeStructs (eval_shape: no weights are made)."""
  subset = zoo.Subset(mode)
  key = jax.random.key(0)
  return jax.eval_shape(lambda: subset.split(model.init(key), key)[0])


def round_plan(stages, device, profiles) -> tl.RoundPlan:
  """One round of f32 guidance; the cloud's and the edge's work as SimulatedClock counts it."""
  clock = SimulatedClock(stages=stages, devices=[device] * _PER_ROUND.value,
                         cloud=profiles_lib.pick(profiles, 'cloud_gpu', 'cloud'),
                         edge=profiles_lib.pick(profiles, 'edge_server', 'edge'),
                         batch_size=_BATCH.value, steps=_STEPS.value, pool_size=_POOL.value,
                         guidance_codec=codec_lib.LeafCodec('f32'), cloud_examples=64,
                         cloud_lag=1)
  n = _PER_ROUND.value
  probes = np.full(n, _STEPS.value, np.int64)
  ones = np.ones(n, bool)
  return clock.plan(1, np.arange(n), 2 * probes, 0 * probes, probes * 4 + 4, 0 * probes, ones,
                    probes, ones)


def main(argv):
  del argv
  try:
    profiles = profiles_lib.load_profiles(_PROFILES.value or None)
    devices = [profiles_lib.pick(profiles, name, 'end') for name in _CLIENTS.value]
    unknown = [m for m in _MODELS.value if m not in common.MODEL_SHAPES]
    if unknown:
      raise CooperError(f'unknown model {unknown[0]!r}; choose from '
                        f'{", ".join(common.MODEL_SHAPES)}')
    for mode in _SUBSETS.value:
      zoo.Subset(mode)
    if min(_PER_ROUND.value, _BATCH.value, _SEQ.value, _STEPS.value, _POOL.value) < 1:
      raise CooperError('--clients_per_round, --batch, --seq, --steps and --pool must be >= 1')
    if not (len(_GANTT.value) == 3 and _GANTT.value[0] in _MODELS.value
            and _GANTT.value[1] in _SUBSETS.value and _GANTT.value[2] in _CLIENTS.value):
      raise CooperError(f'--gantt={",".join(_GANTT.value)} must name one of the measured '
                        'model,subset,client combinations')
  except CooperError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  out = pathlib.Path(_WORKDIR.value)
  out.mkdir(parents=True, exist_ok=True)
  results, gantt = [], None
  for name in _MODELS.value:
    model = common.MODEL_SHAPES[name]()
    for mode in _SUBSETS.value:
      stages = wl.model_stages(model, trainable_shapes(model, mode), _SEQ.value)
      for device in devices:
        plan = round_plan(stages, device, profiles)
        formats, sizes = tl.dtc_formats(plan)
        dtc = dataclasses.replace(plan, guidance_bytes=sizes)
        events = {(fmt, p): tl.simulate(tl.round_tasks(q, p))
                  for fmt, q in (('f32', plan), ('dtc', dtc)) for p in (False, True)}
        seconds = {k: tl.makespan(v) for k, v in events.items()}
        row = {'model': name, 'subset': mode, 'client': device.name,
               'trainable': int(wl.total(stages, 'trainable')),
               'guidance_bytes_f32': int(sum(plan.guidance_bytes)),
               'guidance_bytes_dtc': int(sum(sizes)),
               'dtc_formats': {f: formats.count(f) for f in sorted(set(formats))},
               'sequential_f32_s': seconds['f32', False], 'pipelined_f32_s': seconds['f32', True],
               'sequential_dtc_s': seconds['dtc', False], 'pipelined_dtc_s': seconds['dtc', True]}
        row['spc_saving_f32'] = 1 - row['pipelined_f32_s'] / row['sequential_f32_s']
        row['spc_saving_dtc'] = 1 - row['pipelined_dtc_s'] / row['sequential_dtc_s']
        row['spc_dtc_speedup'] = row['sequential_f32_s'] / row['pipelined_dtc_s']
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
        if [name, mode, device.name] == _GANTT.value:
          gantt = (f'{name} ({mode}), {_PER_ROUND.value} x {device.name}',
                   {'sequential, f32 guidance': events['f32', False],
                    'SPC pipelined, f32 guidance': events['f32', True],
                    'SPC pipelined + DTC': events['dtc', True]})
  plot_gantt(gantt[1], out / 'gantt.png', f'one CooperLLM round: {gantt[0]}')
  settings = {'clients_per_round': _PER_ROUND.value, 'batch': _BATCH.value, 'seq': _SEQ.value,
              'steps': _STEPS.value, 'pool': _POOL.value, 'cloud': 'cloud_gpu',
              'edge': 'edge_server', 'cloud_lag': 1}
  (out / 'results.json').write_text(json.dumps({'settings': settings, 'rounds': results},
                                               indent=2))
  lines = [f'One round, {_PER_ROUND.value} clients, {_STEPS.value} step(s) of {_BATCH.value} x '
           f'{_SEQ.value} tokens, m = {_POOL.value}; seconds of simulated time.', '',
           '| model | subset | client | V f32 MB | V DTC MB | sequential | SPC | SPC saving '
           '| sequential+DTC | SPC+DTC | SPC+DTC vs sequential f32 |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in results:
    lines.append(
        f'| {r["model"]} | {r["subset"]} | {r["client"]} | {r["guidance_bytes_f32"] / 1e6:.2f} | '
        f'{r["guidance_bytes_dtc"] / 1e6:.2f} | {r["sequential_f32_s"]:.2f} | '
        f'{r["pipelined_f32_s"]:.2f} | {100 * r["spc_saving_f32"]:.1f}% | '
        f'{r["sequential_dtc_s"]:.2f} | {r["pipelined_dtc_s"]:.2f} | '
        f'{r["spc_dtc_speedup"]:.2f}x |')
  (out / 'table.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)

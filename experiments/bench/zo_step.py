r"""Time and memory of one ZO-SGD step against a forward pass and a backprop + AdamW step, the
latter on every weight (bp_adamw) and on the ZO step's own trainable subset (bp_same_subset).

  python -m experiments.bench.zo_step --models=minilm,smollm2 --batch=16 --seq=128 --repeats=5

For each model: seconds per call (median over --repeats, after a warm-up call, the functions called
in turn so that machine load hits all alike; cpu_median_s: this process's CPU seconds, which other
jobs on the cores change less) and XLA's static memory estimate
(cooperllm_jax.memory) of each jitted function, compiled once and run from that executable. Training
state (params, optimizer state, trainable weights) is donated. A central-difference step runs 2
forwards per probe, so with every layer trained its time ratio to a forward pass has floor 2P (with
'head', XLA computes the unperturbed body once for both probes, so it can go below). The memory
target is a ZO step peak <= 1.15x the forward pass's. Each ZO step is timed once per
--distributions entry (threefry 'gaussian' and the counter hash 'gaussian_hash' by default), side
by side, under report['models'][model]['zo'][distribution][subset]. Prints one JSON object on
stdout, progress on stderr; on a loaded machine compare the min_s and CPU-time ratios too.

--breakdown adds the memory of the estimate (forwards only) and of the update (apply_directions)
alone; --dump_dir writes each executable's optimized HLO. --mezo times a peer in the same rounds:
PyTorch MeZO's in-place step on every weight of MiniLM and its forward pass, on the same weights,
batch and CPU threads (report['models']['minilm']['mezo']: our full-weight step's speed-up over it
per distribution).
"""

import itertools
import os
import pathlib
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cooperllm_jax import zoo
from cooperllm_jax.memory import memory_of
from cooperllm_jax.models.common import make_loss
from experiments.bench import common

_MODELS = flags.DEFINE_list('models', ['minilm', 'smollm2'], 'Models to benchmark.')
_SUBSETS = flags.DEFINE_list('subsets', ['full', 'lora', 'head'], 'Trainable subsets for ZO.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per function (after one warm-up).')
_PROBES = flags.DEFINE_integer('probes', 1, 'SPSA probes per ZO step.')
_DISTRIBUTIONS = flags.DEFINE_list('distributions', ['gaussian', 'gaussian_hash'],
                                   'Directions to time side by side (zoo.keys.DISTRIBUTIONS): '
                                   'threefry and the counter hash.')
_BREAKDOWN = flags.DEFINE_bool('breakdown', False, 'Also report the memory of the ZO estimate '
                               '(forwards only) and of the update (apply_directions) alone.')
_DUMP_DIR = flags.DEFINE_string('dump_dir', None, "Write each compiled function's HLO here.")
_MEZO = flags.DEFINE_bool('mezo', False, "Also time PyTorch MeZO's step on every weight and its "
                          'forward pass, interleaved with ours (minilm only; needs torch and '
                          'transformers).')

TARGET = 1.15   # ZO step peak / forward peak, from the issue
EPS, LR = 1e-3, 1e-5


def _tag(mode, distribution):
  return f'zo_{mode}_{distribution}'


def compile_(name, fn, *args, donate_argnums=()):
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  if _DUMP_DIR.value:
    path = pathlib.Path(_DUMP_DIR.value) / f'{name}.hlo.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compiled.as_text())
  return compiled


def prepare(name, fn, *args, state=0):
  """Compiles fn(*args) donating its first `state` arguments (the training state, which its first
  `state` outputs replace). Returns (memory, (call, initial state)) for common.timed."""
  common.log(f'  {name}: compiling')
  compiled = compile_(name, fn, *args, donate_argnums=tuple(range(state)))
  init = tuple(jax.tree.map(jnp.copy, a) for a in args[:state])  # donated: the caller keeps args
  call = lambda s: tuple(compiled(*s, *args[state:])[:state]) if state else compiled(*args)
  return memory_of(compiled), (call, init)


def mezo_calls(pre, batch, eps, lr):
  """The peer: PyTorch MeZO's ZO-SGD step (Malladi et al. 2023, its trainer's zo_step and
  zo_update) on our MiniLM's weights: transformers' BertModel of the same checkpoint, our
  classifier head, mean pooling and cross-entropy, the same batch, as many threads as XLA's CPU
  backend. Each step reseeds torch's generator and draws z = torch.normal per weight four times,
  adding it in place (+eps, -2 eps, +eps, then -lr g), every weight trained. Its in-place add_ is
  one pass per weight where the reference's param.data = param.data + s * z * eps makes three, so
  the peer runs at its faster form.

  Returns ({'mezo_forward', 'mezo_step'}: (call, state) for common.timed, the gap between its loss
  and ours at the same weights, torch's thread count)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import assets  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  bert = transformers.BertModel.from_pretrained(str(assets.MINILM.path()),
                                                add_pooling_layer=False).eval()
  kernel, bias = (pre.params['head']['classifier'][k] for k in ('kernel', 'bias'))
  head = torch.nn.Linear(*kernel.shape)
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(np.asarray(kernel).T.copy()))
    head.bias.copy_(torch.from_numpy(np.array(bias)))
  weights = [*bert.parameters(), *head.parameters()]
  for w in weights:
    w.requires_grad_(False)
  n_ours = sum(x.size for x in jax.tree.leaves(pre.params))
  if sum(w.numel() for w in weights) != n_ours:
    raise ValueError(f'MeZO trains {sum(w.numel() for w in weights)} weights, ours {n_ours}')
  ids, mask, labels = (torch.from_numpy(np.asarray(batch[k]).astype(np.int64))
                       for k in ('input_ids', 'attention_mask', 'labels'))

  @torch.inference_mode()
  def loss():
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return torch.nn.functional.cross_entropy(head(pooled), labels)

  @torch.inference_mode()
  def move(seed, scale):
    torch.manual_seed(seed)
    for w in weights:
      w.add_(torch.normal(0.0, 1.0, size=w.shape, dtype=w.dtype), alpha=scale)

  seeds = itertools.count()

  def forward(state):
    loss()
    return state

  def step(state):
    seed = next(seeds)
    move(seed, eps)
    plus = loss()
    move(seed, -2 * eps)
    minus = loss()
    move(seed, eps)
    move(seed, -lr * ((plus - minus).item() / (2 * eps)))
    return state

  gap = abs(loss().item() - float(jax.jit(make_loss(pre.model))(pre.params, batch)))
  calls = {'mezo_forward': (forward, ()), 'mezo_step': (step, ())}
  return calls, gap, torch.get_num_threads()


def bench_model(name):
  common.log(f'{name}: loading')
  pre = common.load(name)
  model, params = pre.model, pre.params
  loss = make_loss(model)
  batch = common.synthetic_batch(model.cfg.vocab_size, (_BATCH.value,), _SEQ.value)
  memory, calls = {}, {}

  memory['forward'], calls['forward'] = prepare(f'{name}.forward', lambda p, b: loss(p, b),
                                                params, batch)
  opt = optax.adamw(LR)
  one_step = jax.tree.map(lambda x: x[None], batch)   # adamw_steps scans over [S, ...] batches

  def bp_adamw(mode, trainable, frozen):
    return prepare(f'{name}.bp_adamw_{mode}', common.adamw_steps(model, opt, zoo.Subset(mode)),
                   trainable, opt.init(trainable), frozen, one_step, state=2)

  memory['bp_adamw'], calls['bp_adamw'] = bp_adamw('full', params, {})

  probes = jnp.arange(_PROBES.value, dtype=jnp.int32)
  zeros = jnp.zeros_like(probes)
  keys = zoo.address_keys(0, jnp.stack([zeros + 1, zeros, zeros, probes], -1))
  sizes, extra = {}, {}
  for mode in _SUBSETS.value:
    sub = zoo.Subset(mode)
    trainable, frozen = sub.split(params, jax.random.key(0))
    sizes[mode] = sum(x.size for x in jax.tree.leaves(trainable))
    for dist in _DISTRIBUTIONS.value:
      est, tag = zoo.Estimator(eps=EPS, probes=_PROBES.value, distribution=dist), _tag(mode, dist)
      memory[tag], calls[tag] = prepare(f'{name}.{tag}', zoo.make_zo_step(loss, est, sub),
                                        trainable, frozen, batch, keys, jnp.float32(LR), state=1)
    if mode != 'full':   # BP + AdamW on the same subset: the same job
      memory[f'bp_{mode}'], calls[f'bp_{mode}'] = bp_adamw(mode, trainable, frozen)
    for dist in _DISTRIBUTIONS.value if _BREAKDOWN.value else ():
      tag = _tag(mode, dist)
      coefs = jnp.full((_PROBES.value,), LR, jnp.float32)
      est = zoo.Estimator(eps=EPS, probes=_PROBES.value, distribution=dist)
      extra[tag] = {
          'estimate_memory': memory_of(compile_(f'{name}.{tag}.estimate',
                                                zoo.make_estimate(loss, est, sub), trainable,
                                                frozen, batch, keys)),
          'update_memory': memory_of(compile_(
              f'{name}.{tag}.update',
              lambda t, k, c, d=dist: zoo.apply_directions(t, k, c, d),
              trainable, keys, coefs, donate_argnums=0))}

  if _MEZO.value:
    peer, mezo_gap, torch_threads = mezo_calls(pre, batch, EPS, LR)
    calls.update(peer)
  common.log(f'{name}: timing {", ".join(calls)} ({_REPEATS.value} rounds)')
  load_before = common.environment()['loadavg']
  wall, cpu = common.timed_wall_cpu(calls, _REPEATS.value)
  timing = lambda k: dict(common.summary(wall[k]), cpu_median_s=statistics.median(cpu[k]))
  out = {'params': sum(x.size for x in jax.tree.leaves(params)),
         'param_bytes': sum(x.nbytes for x in jax.tree.leaves(params)),
         'loadavg_timing': [load_before, common.environment()['loadavg']]}
  for k in ('forward', 'bp_adamw'):
    out[k] = {'time': timing(k), 'memory': memory[k]}
  fwd, fwd_peak = out['forward']['time'], memory['forward']['peak_bytes']
  out['zo'] = {dist: {} for dist in _DISTRIBUTIONS.value}
  for mode, dist in itertools.product(_SUBSETS.value, _DISTRIBUTIONS.value):
    tag, bp_same = _tag(mode, dist), 'bp_adamw' if mode == 'full' else f'bp_{mode}'
    r = {'trainable_params': sizes[mode], 'time': timing(tag), 'memory': memory[tag]}
    peak = memory[tag]['peak_bytes']
    r.update(time_over_forward=r['time']['median_s'] / fwd['median_s'],
             time_over_forward_min=r['time']['min_s'] / fwd['min_s'],
             cpu_over_forward=r['time']['cpu_median_s'] / fwd['cpu_median_s'],
             forwards_per_step=zoo.Estimator(probes=_PROBES.value).forwards_per_step,
             peak_over_forward=peak / fwd_peak,
             peak_over_bp=peak / memory['bp_adamw']['peak_bytes'],
             peak_over_bp_same_subset=peak / memory[bp_same]['peak_bytes'],
             bp_same_subset={'time': timing(bp_same), 'memory': memory[bp_same]},
             meets_target=peak <= TARGET * fwd_peak, **extra.get(tag, {}))
    out['zo'][dist][mode] = r
    common.log(f'  {tag}: {r["time"]["median_s"]:.3f} s ({r["time_over_forward"]:.2f}x forward, '
               f'CPU {r["cpu_over_forward"]:.2f}x), '
               f'peak {peak / 2**20:.1f} MiB ({r["peak_over_forward"]:.3f}x forward, '
               f'{r["peak_over_bp"]:.3f}x bp)')
  if _MEZO.value:
    peer_fwd, step = timing('mezo_forward'), timing('mezo_step')
    over = lambda a, b, s='median_s': a[s] / b[s]
    ours = {d: out['zo'][d]['full']['time'] for d in out['zo']}
    out['mezo'] = {'forward': peer_fwd, 'step': step, 'step_over_forward': over(step, peer_fwd),
                   'step_over_forward_cpu': over(step, peer_fwd, 'cpu_median_s'),
                   'forward_over_ours': over(peer_fwd, fwd),
                   'loss_gap_to_ours': mezo_gap, 'torch_threads': torch_threads,
                   # our full-weight step's speed-up: MeZO's step time / ours (median, min, CPU)
                   'speedup': {d: over(step, t) for d, t in ours.items()},
                   'speedup_min': {d: over(step, t, 'min_s') for d, t in ours.items()},
                   'speedup_cpu': {d: over(step, t, 'cpu_median_s') for d, t in ours.items()}}
    common.log(f'  mezo: step {step["median_s"]:.3f} s ({out["mezo"]["step_over_forward"]:.2f}x '
               f'its forward, {out["mezo"]["forward_over_ours"]:.2f}x ours); ours faster by '
               + ', '.join(f'{x:.2f}x ({d})' for d, x in out['mezo']['speedup'].items()))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  report = {'benchmark': 'zo_step', 'env': common.environment(),
            'config': {'batch': _BATCH.value, 'seq': _SEQ.value, 'probes': _PROBES.value,
                       'repeats': _REPEATS.value, 'scheme': 'central', 'lr': LR,
                       'distributions': _DISTRIBUTIONS.value,
                       'target_peak_over_forward': TARGET},
            'models': {}}
  if _MEZO.value and (_MODELS.value != ['minilm'] or 'full' not in _SUBSETS.value):
    raise app.UsageError('--mezo compares full-weight steps on MiniLM: pass --models=minilm and '
                         'full among --subsets')
  for name in _MODELS.value:
    report['models'][name] = bench_model(name)
  report['target_met'] = all(r['meets_target'] for m in report['models'].values()
                             for by_mode in m['zo'].values() for r in by_mode.values())
  report['env']['loadavg_end'] = common.environment()['loadavg']
  common.emit(report)


if __name__ == '__main__':
  app.run(main)

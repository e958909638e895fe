r"""Simulated client-steps per second of one federated round, for several clients per call.

  python -m experiments.bench.client_throughput --clients=1,8,64 --chunk=8 --local_steps=2
  python -m experiments.bench.client_throughput --clients=20,100,1000 --trainable=lora \
      --local_steps=1 --rounds=1 --plot=experiments/results/client_throughput_cpu.png
  python -m experiments.bench.client_throughput --population=1000 --clients=10,20,50,100 \
      --trainable=lora --local_steps=1 --rounds=3

Runs the algorithm object API (make_algorithm / init / run_round) on synthetic batches
{name: [C, S, B, T]}: one warm-up round (compiles), then --rounds timed rounds, each blocked on the
new state. client-steps/s = C * S / seconds per round, so it includes the edge's replay of the
round's C * S * P ledger entries as well as the clients' local steps. With --population=N the
federation has N clients (config num_clients) and each round samples its C of them as the training
loop does (client_data.sample_clients), so the timed rounds run different clients; without it the
C clients are the whole federation and every round runs them all.

Beside the speed, per client count: the forward-pass floor (a client-step runs
Estimator.forwards_per_step forwards of one [B, T] batch; `over_floor` is the round's time over
that many forwards, timed in the same process just before; the clients' vmapped chunks can beat
it, their matmuls being --chunk times larger), the process's peak resident memory during the timed
rounds (host; also after each round, to show it bounded), and XLA's plan for the clients' jitted
call (device): both should stay flat as the clients grow, since the clients run in a lax.map of
--chunk at a time and only their [C, S, P] scalars leave it. Prints one JSON object on stdout,
progress on stderr; --plot also draws the curve.
"""

import pathlib
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.algorithms import make_algorithm
from cooperllm_jax.memory import memory_of
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo.spsa import loss_at
from experiments.bench import common
from experiments.configs import demo

_MODEL = flags.DEFINE_string('model', 'minilm', 'Model name.')
_CLIENTS = flags.DEFINE_list('clients', ['1', '8', '64'], 'Clients per round (per call).')
_CHUNK = flags.DEFINE_integer('chunk', 8, 'Clients vmapped together (client_chunk).')
_LOCAL_STEPS = flags.DEFINE_integer('local_steps', 2, 'Local steps per client.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Batch size per local step.')
_SEQ = flags.DEFINE_integer('seq', 64, 'Sequence length.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds per client count (after a warm-up).')
_ALGORITHM = flags.DEFINE_string('algorithm', 'fedmezo', 'fedmezo, fedkseed, decomfl, fwdllm.')
_TRAINABLE = flags.DEFINE_string('trainable', 'full', 'Trainable subset: full, bitfit, head, lora.')
_BACKEND = flags.DEFINE_enum('backend', 'map', ['map', 'loop'], 'client_backend.')
_PROBES = flags.DEFINE_integer('probes', 1, 'SPSA probes per local step.')
_POPULATION = flags.DEFINE_integer('population', None, 'Clients in the federation, of which each '
                                   'round samples --clients (default: each count is the whole '
                                   'federation).')
_PLOT = flags.DEFINE_string('plot', None, 'Also draw client-steps/s and memory against clients '
                            '(a matplotlib png at this path).')


def config() -> ml_collections.ConfigDict:
  """The demo config (so every field the algorithms read is there) with this benchmark's flags."""
  c = demo.get_config(_ALGORITHM.value)
  c.learning_rate = 1e-5
  c.client_chunk = _CHUNK.value
  c.client_backend = _BACKEND.value
  c.zo.probes = _PROBES.value
  c.zo.trainable = _TRAINABLE.value
  c.fwdllm.min_probes = min(2, _PROBES.value)
  if _POPULATION.value:
    c.num_clients = _POPULATION.value
  return c


def peak_rss_reset():
  """Starts a new peak of this process's resident memory (Linux: /proc/self/clear_refs)."""
  pathlib.Path('/proc/self/clear_refs').write_text('5')


def peak_rss_bytes() -> int:
  """This process's peak resident memory since the last peak_rss_reset (VmHWM)."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) * 1024
  raise RuntimeError('no VmHWM in /proc/self/status')


def forward_seconds(alg, state, batch, repeats=5):
  """(wall, CPU) seconds of one forward pass of the clients' model on one [B, T] batch, the
  trainable weights merged as the clients' forwards merge them; min over `repeats` calls."""
  loss = make_loss(alg.model)
  fn = jax.jit(lambda t, f, b: loss_at(loss, t, f, b, None, 0.0, subset=alg.subset))
  args = (state.trainable, state.frozen, batch)
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  return min(wall), min(cpu)


def bench_clients(alg, params, vocab_size, num_clients):
  """Seconds per round of num_clients clients: a warm-up round, then --rounds timed ones; the
  forward-pass floor and the host and device memory beside them."""
  steps = _LOCAL_STEPS.value
  batches = common.synthetic_batch(vocab_size, (num_clients, steps, _BATCH.value), _SEQ.value)
  counts = jnp.full((num_clients,), steps * _BATCH.value, jnp.float32)
  population = _POPULATION.value or num_clients

  def clients(r):
    if not _POPULATION.value:
      return jnp.arange(num_clients, dtype=jnp.int32)
    return jnp.asarray(client_data.sample_clients(population, num_clients, 0, r), jnp.int32)

  state = alg.init(params)
  common.log(f'  {num_clients} of {population} clients: warm-up round (compiles)')
  start = time.perf_counter()
  state, _ = alg.run_round(state, batches, counts, clients(0), 0)
  jax.block_until_ready(state)
  first = time.perf_counter() - start
  fwd_s, fwd_cpu = forward_seconds(alg, state, jax.tree.map(lambda x: x[0, 0], batches))
  times, cpu, rss_rounds = [], [], []
  peak_rss_reset()
  for r in range(1, _ROUNDS.value + 1):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, _ = alg.run_round(state, batches, counts, clients(r), r)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
    rss_rounds.append(peak_rss_bytes())
  rss = rss_rounds[-1]
  median = statistics.median(times)
  device = memory_of(alg.round.clients.lower(state.trainable, state.frozen, batches,
                                             clients(0), jnp.int32(0), state.lr).compile())
  forwards = int(alg.est.forwards(_PROBES.value, 1)) * num_clients * steps
  # CPU seconds of this process (all its threads) per round: the work done, whatever share of the
  # cores other processes left it (wall time on a shared machine depends on that share).
  out = {'clients': num_clients, 'population': population, 'client_steps': num_clients * steps,
         'round': common.summary(times), 'round_s': times,
         'cpu_s_per_round': statistics.median(cpu),
         'warmup_round_s': first, 'client_steps_per_s': num_clients * steps / median,
         'forward': {'wall_s': fwd_s, 'cpu_s': fwd_cpu, 'forwards_per_round': forwards},
         'floor_client_steps_per_s': num_clients * steps / (forwards * fwd_s),
         'over_floor': median / (forwards * fwd_s),
         'over_floor_cpu': statistics.median(cpu) / (forwards * fwd_cpu),
         'peak_rss_bytes': rss, 'peak_rss_after_round_bytes': rss_rounds,
         'clients_call_memory': device}
  common.log(f'  {num_clients} of {population} clients: {median:.3f} s/round, '
             f'{out["client_steps_per_s"]:.2f} client-steps/s ({out["over_floor"]:.2f}x the '
             f'forward floor), peak RSS {rss / 2**20:.0f} MiB, clients call '
             f'{device["peak_bytes"] / 2**20:.0f} MiB')
  return out


def plot(report, path):
  """client-steps/s (and the forward floor) and the memory peaks against clients per round."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = report['results']
  clients = [r['clients'] for r in rows]
  fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
  speed.plot(clients, [r['client_steps_per_s'] for r in rows], 'o-', label='measured')
  speed.plot(clients, [r['floor_client_steps_per_s'] for r in rows], 'k--',
             label='2 forwards of one batch per client-step')
  speed.set(xscale='log', xlabel='clients per round', ylabel='client-steps / s', ylim=(0, None))
  speed.legend()
  mib = lambda b: b / 2 ** 20
  memory.plot(clients, [mib(r['peak_rss_bytes']) for r in rows], 'o-', label='peak RSS (host)')
  memory.plot(clients, [mib(r['clients_call_memory']['peak_bytes']) for r in rows], 's-',
              label="clients' call (XLA plan)")
  memory.set(xscale='log', xlabel='clients per round', ylabel='MiB', ylim=(0, None))
  memory.legend()
  c = report['config']
  fig.suptitle(f"{c['model']} {c['trainable']}, {c['algorithm']}, {c['local_steps']} local "
               f"step(s) of {c['batch']} x {c['seq']}, chunk {c['chunk']} "
               f"({report['env']['backend']}, {report['env']['cpus']} cores)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.log(f'{_MODEL.value}: loading')
  pre = common.load(_MODEL.value)
  cfg = config()
  alg = make_algorithm(cfg, pre.model)
  report = {'benchmark': 'client_throughput', 'env': common.environment(),
            'config': {'model': _MODEL.value, 'algorithm': cfg.algorithm, 'backend': _BACKEND.value,
                       'trainable': _TRAINABLE.value, 'population': _POPULATION.value,
                       'distribution': cfg.zo.distribution, 'chunk': _CHUNK.value,
                       'local_steps': _LOCAL_STEPS.value, 'batch': _BATCH.value,
                       'seq': _SEQ.value, 'probes': _PROBES.value, 'rounds': _ROUNDS.value},
            'results': [bench_clients(alg, pre.params, pre.model.cfg.vocab_size, int(c))
                        for c in _CLIENTS.value]}
  report['env']['loadavg_end'] = common.environment()['loadavg']
  if _PLOT.value:
    plot(report, _PLOT.value)
  common.emit(report)


if __name__ == '__main__':
  app.run(main)

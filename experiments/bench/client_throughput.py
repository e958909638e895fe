r"""Simulated client-steps per second of one federated round, for several clients per call.

  python -m experiments.bench.client_throughput --clients=1,8,64 --chunk=8 --local_steps=2

Runs the algorithm object API (make_algorithm / init / run_round) on synthetic batches
{name: [C, S, B, T]}: one warm-up round (compiles), then --rounds timed rounds, each blocked on the
new state. client-steps/s = C * S / seconds per round, so it includes the edge's replay of the
round's C * S * P ledger entries as well as the clients' local steps. Prints one JSON object on
stdout, progress on stderr.
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from cooperllm_jax.federated.algorithms import make_algorithm
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


def config() -> ml_collections.ConfigDict:
  """The demo config (so every field the algorithms read is there) with this benchmark's flags."""
  c = demo.get_config(_ALGORITHM.value)
  c.learning_rate = 1e-5
  c.client_chunk = _CHUNK.value
  c.client_backend = _BACKEND.value
  c.zo.probes = _PROBES.value
  c.zo.trainable = _TRAINABLE.value
  c.zo.fwdllm_min_probes = min(2, _PROBES.value)
  return c


def bench_clients(alg, params, vocab_size, num_clients):
  """Seconds per round of num_clients clients: a warm-up round, then --rounds timed ones."""
  steps = _LOCAL_STEPS.value
  batches = common.synthetic_batch(vocab_size, (num_clients, steps, _BATCH.value), _SEQ.value)
  counts = jnp.full((num_clients,), steps * _BATCH.value, jnp.float32)
  clients = jnp.arange(num_clients, dtype=jnp.int32)
  state = alg.init(params)
  common.log(f'  {num_clients} clients: warm-up round (compiles)')
  start = time.perf_counter()
  state, _ = alg.run_round(state, batches, counts, clients, 0)
  jax.block_until_ready(state)
  first = time.perf_counter() - start
  times, cpu = [], []
  for r in range(1, _ROUNDS.value + 1):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, _ = alg.run_round(state, batches, counts, clients, r)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  median = statistics.median(times)
  # CPU seconds of this process (all its threads) per round: the work done, whatever share of the
  # cores other processes left it (wall time on a shared machine depends on that share).
  out = {'clients': num_clients, 'client_steps': num_clients * steps,
         'round': common.summary(times), 'cpu_s_per_round': statistics.median(cpu),
         'warmup_round_s': first, 'client_steps_per_s': num_clients * steps / median}
  common.log(f'  {num_clients} clients: {median:.3f} s/round, '
             f'{out["client_steps_per_s"]:.2f} client-steps/s')
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.log(f'{_MODEL.value}: loading')
  pre = common.load(_MODEL.value)
  cfg = config()
  alg = make_algorithm(cfg, pre.model)
  report = {'benchmark': 'client_throughput', 'env': common.environment(),
            'config': {'model': _MODEL.value, 'algorithm': cfg.algorithm, 'backend': _BACKEND.value,
                       'trainable': _TRAINABLE.value, 'chunk': _CHUNK.value,
                       'local_steps': _LOCAL_STEPS.value, 'batch': _BATCH.value,
                       'seq': _SEQ.value, 'probes': _PROBES.value, 'rounds': _ROUNDS.value},
            'results': [bench_clients(alg, pre.params, pre.model.cfg.vocab_size, int(c))
                        for c in _CLIENTS.value]}
  report['env']['loadavg_end'] = common.environment()['loadavg']
  common.emit(report)


if __name__ == '__main__':
  app.run(main)

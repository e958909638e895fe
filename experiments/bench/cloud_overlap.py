r"""Wall time of a cooperllm round with the cloud's BP in series (cloud_lag=0) or overlapped with the
clients (cloud_lag=1), measured side by side.

  python -m experiments.bench.cloud_overlap --trainable=lora --rounds=4
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench.cloud_overlap \
      --cloud_devices=4          # the cloud on devices 4..7, the clients on device 0

With lag 0 a round is cloud BP, then the clients; with lag 1 round r's cloud step (for round r+1)
is dispatched before round r's clients and runs concurrently (async dispatch; on disjoint devices
with --cloud_devices). Rounds alternate between the two configurations so load from other
processes hits both alike. Real MiniLM weights, synthetic batches (the demo's shapes). Prints one
JSON object: seconds per round for each, and lag1 / lag0.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from cooperllm_jax.federated.algorithms import make_algorithm
from experiments.bench import common
from experiments.configs import demo

_TRAINABLE = flags.DEFINE_string('trainable', 'lora', 'Trainable subset: full, bitfit, head, lora.')
_CLIENTS = flags.DEFINE_integer('clients', 4, 'Clients per round.')
_LOCAL_STEPS = flags.DEFINE_integer('local_steps', 4, 'Local steps per client.')
_CLOUD_BATCHES = flags.DEFINE_integer('cloud_batches', 4, 'Public batches per cloud step.')
_CLOUD_DEVICES = flags.DEFINE_integer('cloud_devices', 0, 'Devices for the cloud (0: shared).')
_ROUNDS = flags.DEFINE_integer('rounds', 4, 'Timed rounds per configuration (after a warm-up).')


def _algorithm(pre, lag: int):
  config = demo.get_config('cooperllm')
  config.zo.trainable = _TRAINABLE.value
  config.learning_rate = 1e-5
  config.cloud.lag, config.cloud.devices = lag, _CLOUD_DEVICES.value
  config.cloud.batches = _CLOUD_BATCHES.value
  public = common.synthetic_batch(pre.model.config.vocab_size, (256,), config.max_length, seed=1)
  alg = make_algorithm(config, pre.model, jax.tree.map(lambda x: jax.device_get(x), public))
  return alg, alg.init(pre.params), config


def main(argv):
  del argv
  pre = common.load('minilm')
  runs = {lag: _algorithm(pre, lag) for lag in (0, 1)}
  config = runs[0][2]
  batches = common.synthetic_batch(pre.model.config.vocab_size,
                                   (_CLIENTS.value, _LOCAL_STEPS.value, config.batch_size),
                                   config.max_length)
  counts = jnp.ones(_CLIENTS.value)
  clients = jnp.arange(_CLIENTS.value, dtype=jnp.int32)
  times = {0: [], 1: []}
  states = {lag: state for lag, (_, state, _) in runs.items()}
  for r in range(1, _ROUNDS.value + 2):
    for lag, (alg, _, _) in runs.items():
      common.log(f'round {r}, cloud_lag={lag}')
      start = time.perf_counter()
      states[lag], _ = alg.run_round(states[lag], batches, counts, clients, r)
      jax.block_until_ready(states[lag].trainable)
      if r > 1:  # round 1 compiles
        times[lag].append(time.perf_counter() - start)
  lag0, lag1 = common.summary(times[0]), common.summary(times[1])
  common.emit({'trainable': _TRAINABLE.value, 'clients': _CLIENTS.value,
               'local_steps': _LOCAL_STEPS.value, 'cloud_batches': _CLOUD_BATCHES.value,
               'cloud_devices': _CLOUD_DEVICES.value, 'devices': len(jax.devices()),
               'lag0': lag0, 'lag1': lag1,
               'lag1_over_lag0': lag1['median_s'] / lag0['median_s'],
               'environment': common.environment()})


if __name__ == '__main__':
  app.run(main)

r"""Client-steps per second of one federated round as the clients axis grows: 1, 2, 4, 8 devices.

  python -m experiments.bench.client_scaling --devices=1,2,4,8 --clients=8 --trainable=head

Each device count runs in its own subprocess (the device count is fixed when JAX starts; on CPU
XLA_FLAGS=--xla_force_host_platform_device_count=n simulates n devices) with the round's clients
split over a mesh of that many 'clients' (1: no mesh, today's single-device path). The timing is
client_throughput's (the same flags, minus --backend): a warm-up round, then --rounds timed ones,
edge replay included. On CPU the simulated devices share the machine's cores, so this measures the
overhead and load balance of the sharded round more than a speed-up; on accelerators each device
is real. Prints one JSON object on stdout, progress on stderr.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags
import jax

from cooperllm_jax.federated.algorithms import make_algorithm
from experiments.bench import client_throughput, common

FLAGS = flags.FLAGS

_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Device counts, one subprocess each.')
_WORKER = flags.DEFINE_bool('worker', False, 'Internal: measure one device count (--devices).')
FLAGS.set_default('clients', ['8'])     # client_throughput's flag: clients per round
FLAGS.set_default('trainable', 'head')


def measure(devices: int) -> list:
  """client_throughput's measurement for each --clients, on a mesh of `devices` clients."""
  if len(jax.devices()) != devices:
    raise RuntimeError(f'asked for {devices} devices, JAX has {len(jax.devices())}')
  pre = common.load(FLAGS.model)
  cfg = client_throughput.config()
  cfg.mesh.clients = devices
  results = []
  for c in map(int, FLAGS.clients):
    cfg.clients_per_round = c
    alg = make_algorithm(cfg, pre.model)
    results.append(dict(client_throughput.bench_clients(alg, pre.params, pre.model.cfg.vocab_size,
                                                        c), devices=devices))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    print('RESULT ' + json.dumps(measure(int(_DEVICES.value[0]))), flush=True)
    return
  results, loadavg = [], common.environment()['loadavg']
  for n in map(int, _DEVICES.value):
    common.log(f'{n} device(s):')
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    env = dict(os.environ, XLA_FLAGS=xla_flags.strip())
    proc = subprocess.run([sys.executable, '-m', 'experiments.bench.client_scaling',
                           *sys.argv[1:], '--worker', f'--devices={n}'],
                          env=env, stdout=subprocess.PIPE, text=True, check=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
    results += json.loads(line[len('RESULT '):])
  base = {r['clients']: r['client_steps_per_s'] for r in results if r['devices'] == 1}
  for r in results:
    if r['clients'] in base:
      r['vs_1_device'] = r['client_steps_per_s'] / base[r['clients']]
  report = {'benchmark': 'client_scaling', 'env': dict(common.environment(), loadavg_start=loadavg),
            'config': {k: FLAGS[k].value for k in ('model', 'algorithm', 'trainable', 'chunk',
                                                   'local_steps', 'batch', 'seq', 'probes',
                                                   'rounds')},
            'results': results}
  common.emit(report)


if __name__ == '__main__':
  app.run(main)

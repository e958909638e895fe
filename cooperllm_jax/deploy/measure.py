r"""What a loopback federation costs (docs/deployment.md's table): bytes on the wire per end device
and round against the run's accounted bytes, seconds per round, and peak memory per process.

  python -m cooperllm_jax.deploy.measure --workdir=/tmp/fed --config=... (local.py's flags)

Each end device dials the SuperLink through a relay on loopback that counts the bytes both ways
(HTTP framing, polling and heartbeats included); every process's peak resident memory (VmHWM) is
sampled from /proc every 0.2 s. Prints a markdown table; writes it with the raw numbers to
WORKDIR/flower/measure.json.
"""

import json
import os
import pathlib
import socket
import threading
import time

from absl import flags

from cooperllm_jax import cli
from cooperllm_jax.deploy import local, procs
from cooperllm_jax.deploy.apps import WIRE_LOG

FLAGS = flags.FLAGS
ROLES = (('flwr-serverapp', 'edge (ServerApp)'), ('flwr-clientapp', 'end device (ClientApp)'),
         ('flower-superexec', 'SuperExec'), ('flower-supernode', 'SuperNode'),
         ('flower-superlink', 'SuperLink'))


class Relay:
  """A TCP relay on loopback to `target` that counts the bytes each way."""

  def __init__(self, target: str):
    host, port = target.rsplit(':', 1)
    self.target, self.up, self.down = (host, int(port)), 0, 0
    self.server = socket.create_server(('127.0.0.1', 0))
    self.address = f'127.0.0.1:{self.server.getsockname()[1]}'
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self):
    while True:
      inner, _ = self.server.accept()
      try:
        outer = socket.create_connection(self.target)
      except OSError:   # the SuperLink is not up yet: the SuperNode dials again
        inner.close()
        continue
      threading.Thread(target=self._pump, args=(inner, outer, 'up'), daemon=True).start()
      threading.Thread(target=self._pump, args=(outer, inner, 'down'), daemon=True).start()

  def _pump(self, src, dst, way):
    try:
      while data := src.recv(1 << 16):
        setattr(self, way, getattr(self, way) + len(data))
        dst.sendall(data)
    except OSError:
      pass
    finally:
      for s in (src, dst):
        try:
          s.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass


class Memory:
  """The peak resident memory of every process of the federation, by role (sampled)."""

  def __init__(self):
    self.peaks, self.stop = {}, threading.Event()

  def watch(self, fed: local.Federation):
    del fed
    threading.Thread(target=self._sample, daemon=True).start()

  def _sample(self):
    while not self.stop.wait(0.2):
      for pid in procs.descendants(os.getpid()):   # all of them: this process is their subreaper
        try:
          cmd = pathlib.Path(f'/proc/{pid}/cmdline').read_bytes()
          status = pathlib.Path(f'/proc/{pid}/status').read_text()
        except OSError:
          continue
        role = next((r for name, r in ROLES if name.encode() in cmd), None)
        hwm = [int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith('VmHWM')]
        if role and hwm:
          self.peaks[role] = max(self.peaks.get(role, 0), hwm[0])


def table(workdir: pathlib.Path, relays: list, peaks: dict, seconds: float) -> dict:
  """The measured numbers and their markdown table."""
  rows = [json.loads(l) for l in (workdir / 'run' / 'metrics.jsonl').read_text().splitlines()[1:]]
  wire = [json.loads(l) for l in (workdir / 'flower' / WIRE_LOG).read_text().splitlines()]
  rounds, nodes = len(rows), len(relays)
  out = {
      'rounds': rounds, 'end_devices': nodes, 'run_seconds': seconds,
      'round_seconds': [w['seconds'] for w in wire],
      'wire_up_per_device_round': sum(r.up for r in relays) / nodes / rounds,
      'wire_down_per_device_round': sum(r.down for r in relays) / nodes / rounds,
      'payload_up_per_device_round': sum(sum(w['up_bytes'].values()) for w in wire) / nodes / rounds,
      'payload_down_per_device_round': sum(sum(w['down_bytes'].values()) for w in wire)
                                       / nodes / rounds,
      'accounted_up_per_client_round': sum(r['bytes_up_per_client'] for r in rows) / rounds,
      'accounted_down_per_client_round': sum(r['bytes_down_per_client'] for r in rows) / rounds,
      'peak_rss_bytes': peaks}
  lines = ['| per end device and round | up | down |', '|---|---:|---:|',
           f'| bytes on the wire (HTTP, polling included) | {out["wire_up_per_device_round"]:,.0f} '
           f'| {out["wire_down_per_device_round"]:,.0f} |',
           f'| payload (the arrays of the messages) | {out["payload_up_per_device_round"]:,.0f} | '
           f'{out["payload_down_per_device_round"]:,.0f} |',
           f'| accounted (RoundResult, metrics.jsonl) | '
           f'{out["accounted_up_per_client_round"]:,.0f} | '
           f'{out["accounted_down_per_client_round"]:,.0f} |', '',
           'seconds per round: ' + ', '.join(f'{s:.1f}' for s in out['round_seconds']), '',
           '| process | peak RSS (MiB) |', '|---|---:|',
           *(f'| {role} | {peaks[role] / 2**20:.0f} |' for _, role in ROLES if role in peaks)]
  out['table'] = '\n'.join(lines)
  return out


def _main(argv) -> None:
  del argv
  with cli.main_errors():
    workdir, nodes = local.check_flags(FLAGS.config)
  relays, memory = [], Memory()

  def route(i, link):
    del i
    relays.append(Relay(link))
    return relays[-1].address

  started = time.perf_counter()
  status = local.federate(FLAGS.config, workdir, nodes, FLAGS.round_timeout, FLAGS.timeout,
                          FLAGS.resume, route, memory.watch)
  memory.stop.set()
  if not status['ok']:
    cli.fail(status['error'])
  out = table(workdir, relays, memory.peaks, time.perf_counter() - started)
  (workdir / 'flower' / 'measure.json').write_text(json.dumps(out, indent=2) + '\n')
  print(out['table'])


if __name__ == '__main__':
  cli.run(_main, local.define_flags())

r"""A federation on loopback in one command: a SuperLink, N end devices (SuperNodes), the run.

  python -m cooperllm_jax.deploy.local --workdir=/tmp/fed --nodes=2 \
      --config=experiments/configs/demo.py:cooperllm --config.num_clients=2 ...

The edge (the ServerApp, with the cloud in its process) writes the run to WORKDIR/run exactly as
the CLI writes its --workdir (metrics.jsonl, checkpoints, ledger, summary.json:
`python -m experiments.replay --workdir=WORKDIR/run` audits it); WORKDIR/flower holds the
federation's own files: each process's log, the edge's status, the wire log (payload bytes per
client and round) and the end devices' compilation cache. End device i holds client i's data
(--nodes defaults to config.num_clients). --resume goes on from the run's newest checkpoint.

Every process runs with telemetry and update checks off, on 127.0.0.1 without TLS, and the
SuperLink installs no app dependencies at run time; each is started in its own session and
stopped by its id (SIGTERM, then SIGKILL) when the run ends, fails or this command is stopped.
A bad flag or config is one `error:` line and exit 2.
"""

import ctypes
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

from absl import flags
from ml_collections import config_flags

from cooperllm_jax import cli
from cooperllm_jax.deploy.apps import STATUS
from cooperllm_jax.deploy.procs import PIDS, descendants, reap, send

APP = pathlib.Path(__file__).with_name('app')
ENV = {'FLWR_TELEMETRY_ENABLED': '0', 'FLWR_DISABLE_UPDATE_CHECK': '1'}
BIN = pathlib.Path(sys.executable).parent
PR_SET_CHILD_SUBREAPER = 36   # prctl: orphans of our descendants come back to us

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command's flags (when it runs, not on import: the CLI defines --config and
  --workdir too) and returns --config's holder."""
  with cli.flag_errors():
    config = config_flags.DEFINE_config_file(
        'config', str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py'),
        'Path to a config file with get_config() (as the CLI\'s --config).')
  flags.DEFINE_string('workdir', None, 'The federation\'s directory (new, or the one to resume): '
                      'the run goes to WORKDIR/run.')
  flags.DEFINE_integer('nodes', None, 'End devices, holding clients 0..N-1 (default: '
                       'config.num_clients).')
  flags.DEFINE_float('round_timeout', 120.0, 'Seconds the edge waits for the replies of a round; '
                     'a missing one is a dropout.')
  flags.DEFINE_float('timeout', 3600.0, 'Seconds the whole run may take.')
  flags.DEFINE_bool('resume', False, 'Continue the run in WORKDIR/run from its newest checkpoint.')
  return config


def free_port() -> int:
  """A TCP port on loopback that is free now (the system's pick)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Federation:
  """The processes of one local federation, each in its own session, stopped by its id."""

  def __init__(self, state_dir: pathlib.Path):
    self.state_dir, self.procs = state_dir, {}
    self.logs = state_dir / 'logs'
    self.logs.mkdir(parents=True, exist_ok=True)
    self.env = {**os.environ, **ENV, 'FLWR_HOME': str(state_dir / 'home'),
                'PATH': f'{BIN}{os.pathsep}{os.environ.get("PATH", "")}'}  # Flower's own commands

  def start(self, name: str, *cmd: str) -> subprocess.Popen:
    with open(self.logs / f'{name}.log', 'ab') as log:
      proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
    self.procs[name] = proc
    (self.state_dir / PIDS).write_text(json.dumps({k: p.pid for k, p in self.procs.items()}))
    return proc

  def stop(self) -> None:
    """SIGTERM to every process this federation started and to their descendants (Flower starts
    its SuperExec, ServerApp and ClientApps detached, in sessions of their own), then SIGKILL to
    what remains. Orphans come back to this process, a child subreaper, so none escapes."""
    pids = set()
    for proc in self.procs.values():
      pids |= {proc.pid} | descendants(proc.pid)
    pids |= descendants(os.getpid())
    for pid in pids:
      send(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in self.procs.values():
      try:
        proc.wait(max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        pass
    for pid in pids | descendants(os.getpid()):
      send(pid, signal.SIGKILL)
    for proc in self.procs.values():
      proc.wait()
    reap()
    (self.state_dir / PIDS).unlink(missing_ok=True)

  def up(self, nodes: int, route: Optional[Callable[[int, str], str]] = None) -> str:
    """Starts the SuperLink and the end devices; returns the SuperLink's address. route(i, link):
    the address end device i dials for the SuperLink at `link` (a relay that counts the bytes:
    measure.py); None: the SuperLink's own."""
    link = f'127.0.0.1:{free_port()}'   # one HTTP port serves the Fleet, Control and Runtime APIs
    self.start('superlink', 'flower-superlink', '--insecure',
               '--disable-runtime-dependency-installation', '--host', '127.0.0.1',
               '--port', link.split(':')[1])
    for i in range(nodes):
      self.start(f'node{i}', 'flower-supernode', '--insecure', '--superlink',
                 link if route is None else route(i, link),
                 '--node-config', f'partition-id={i}', '--host', '127.0.0.1',
                 '--port', str(free_port()))
    home = self.state_dir / 'home'
    home.mkdir(exist_ok=True)
    (home / 'config.toml').write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{link}"\n'
        'insecure = true\n')
    return link


def _edge_processes(pid: int) -> set:
  """The ServerApp processes among pid's descendants."""
  def named(p):
    try:
      return b'flwr-serverapp' in pathlib.Path(f'/proc/{p}/cmdline').read_bytes()
    except OSError:
      return False
  return {p for p in descendants(pid) if named(p)}


def wait_for_edge(fed: Federation, timeout: float) -> dict:
  """The edge's status once it wrote it; an error status if the SuperLink or the edge's process
  (the SuperLink's child) ended without one, or the run took longer than `timeout`."""
  status, link = fed.state_dir / STATUS, fed.procs['superlink']
  deadline, seen = time.monotonic() + timeout, set()
  while time.monotonic() < deadline:
    if status.exists():
      return json.loads(status.read_text())
    edges = _edge_processes(link.pid)
    if link.poll() is not None or (seen and not seen & edges):
      time.sleep(1)   # the edge may have written its status as it ended
      if status.exists():
        return json.loads(status.read_text())
      return {'ok': False, 'error': f'the edge ended without finishing the run (logs: '
                                    f'{fed.logs})'}
    seen |= edges
    time.sleep(0.2)
  return {'ok': False, 'error': f'the run took longer than --timeout={timeout:g}s'}


def check_flags(config) -> tuple:
  """(workdir, nodes) after the flags' checks: a bad one is a CooperError (one line, exit 2)."""
  from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.federated import registry  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.federated.api import Deployable  # pylint: disable=g-import-not-at-top
  import cooperllm_jax.federated.algorithms  # pylint: disable=g-import-not-at-top,unused-import
  if not FLAGS.workdir:
    raise ConfigError('--workdir is required: the federation\'s directory')
  cfg = config_lib.parse(config)
  if not issubclass(registry.lookup(cfg.algorithm), Deployable):
    raise ConfigError(f'{cfg.algorithm} does not split its round at the transport '
                      '(api.Deployable), so it cannot be deployed: the scalar protocols and '
                      'cooperllm can')
  nodes = cfg.data.num_clients if FLAGS.nodes is None else FLAGS.nodes
  if not 1 <= nodes <= cfg.data.num_clients:
    raise ConfigError(f'--nodes={nodes}: pass 1 to num_clients={cfg.data.num_clients} end devices')
  if FLAGS.round_timeout <= 0 or FLAGS.timeout <= 0:
    raise ConfigError('--round_timeout and --timeout must be positive')
  workdir = pathlib.Path(FLAGS.workdir).absolute()
  if FLAGS.resume and not (workdir / 'run').is_dir():
    raise ConfigError(f'--resume: {workdir} holds no run ({workdir / "run"} is missing)')
  if not FLAGS.resume and workdir.exists() and any(workdir.iterdir()):
    raise ConfigError(f'--workdir {workdir} is not empty (pass --resume to continue its run)')
  return workdir, nodes


def federate(config, workdir: pathlib.Path, nodes: int, round_timeout: float, timeout: float,
             resume: bool, route: Optional[Callable[[int, str], str]] = None,
             started: Optional[Callable[[Federation], None]] = None) -> dict:
  """Runs `config` on a loopback federation in workdir (the module docstring) and stops it;
  returns the edge's status. started(federation) is called once its processes are up."""
  import tomli_w  # pylint: disable=g-import-not-at-top
  state_dir = workdir / 'flower'
  fed = Federation(state_dir)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # runs the finally below
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
  try:
    (state_dir / STATUS).unlink(missing_ok=True)
    fed.up(nodes, route)
    if started is not None:
      started(fed)
    run_config = state_dir / 'run_config.toml'
    run_config.write_text(tomli_w.dumps({
        'config': config.to_json(), 'workdir': str(workdir / 'run'), 'state-dir': str(state_dir),
        'nodes': nodes, 'round-timeout': round_timeout, 'resume': resume}))
    with open(fed.logs / 'flwr_run.log', 'ab') as log:
      submitted = subprocess.run([str(BIN / 'flwr'), 'run', str(APP), 'local', '--run-config',
                                  str(run_config)], stdout=log, stderr=subprocess.STDOUT,
                                 env=fed.env, timeout=120, check=False)
    if submitted.returncode:
      return {'ok': False, 'error': f'flwr run failed (exit {submitted.returncode}; its output '
                                    f'is in {log.name})'}
    return wait_for_edge(fed, timeout)
  finally:
    fed.stop()


def _main(argv) -> None:
  del argv
  with cli.main_errors():
    workdir, nodes = check_flags(FLAGS.config)
  status = federate(FLAGS.config, workdir, nodes, FLAGS.round_timeout, FLAGS.timeout,
                    FLAGS.resume)
  if not status['ok']:
    cli.fail(status['error'])
  summary = json.loads((workdir / 'run' / 'summary.json').read_text())
  print(f'summary: {summary["algorithm"]} on {summary["dataset"]} over {nodes} end devices: test '
        f'accuracy {summary["accuracy_before"]:.4f} -> {summary["accuracy_after"]:.4f} after '
        f'{summary["rounds"]} rounds; the run is in {workdir / "run"}')


def main() -> None:
  config = define_flags()
  cli.run(_main, config, lambda: __doc__.strip() + '\n\nflags:\n' + FLAGS.module_help(
      FLAGS.find_module_defining_flag('workdir')))


if __name__ == '__main__':
  main()

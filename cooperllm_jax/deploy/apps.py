"""The Flower apps: the ServerApp is the edge, each ClientApp an end device.

The edge runs the CLI's run loop (run/loop.py train_and_evaluate) with the round split at the
transport (docs/engine.md): prepare -> a message to every sampled end device -> the replies that
arrived by the deadline (Replies.collect: a missing one is a dropout) -> apply. The cloud stays in
the edge's process (docs/deployment.md). An end device is a SuperNode started with
`--node-config 'partition-id=<client>'`: it rebuilds the task from the run config (the same seed
gives the same partition, batches and frozen base model), so only the trainable weights, the
protocol's further arguments and the guidance travel down and only the uplink and losses travel
up, as raw bytes (wire.py). Each message starts a fresh ClientApp process, so it keeps JAX's
compiled programs in a persistent cache.

Run config (the app's pyproject.toml): config (the run's ConfigDict as JSON), workdir (the run's,
as the CLI's --workdir), state-dir (the federation's: the edge's status, the wire log, the
compilation cache), nodes (end devices to wait for), round-timeout (the deadline, seconds),
resume (bool).
"""

import json
import pathlib
import time
import traceback
from typing import Any, Optional

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from cooperllm_jax.deploy import wire

STATUS = 'edge.json'      # the edge's outcome in state-dir: {"ok": bool, "error": str}
EDGE_LOG = 'edge.log'     # the edge's log lines (the run loop's) and a failure's traceback
WIRE_LOG = 'wire.jsonl'   # one line per round: payload bytes down/up per client, seconds
CACHE = 'jax_cache'       # the end devices' persistent compilation cache in state-dir

server = ServerApp()
client = ClientApp()


def _config(run_config) -> Any:
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(json.loads(run_config['config']))


def _template(trainable, extras: int, guided: bool) -> tuple:
  """The structure of what travels down: (trainable, extra, guide, client id, count, lr)."""
  from cooperllm_jax.zoo.guided import Guidance  # pylint: disable=g-import-not-at-top
  guide = Guidance(trainable, *[0] * 6) if guided else None
  return (trainable, (trainable,) * extras, guide, 0, 0, 0)


class FlowerClients:
  """The edge's transport: run_clients(state, messages, batches) -> Replies over Flower.

  A sampled client with no end device connected, or whose reply is an error or has not come by
  the deadline, is a dropout. Each round's payload bytes and seconds go to the wire log.
  """

  def __init__(self, grid: Grid, nodes: dict, steps: int, probes: int, timeout: float,
               log_path: pathlib.Path):
    self.grid, self.nodes, self.steps, self.probes = grid, nodes, steps, probes
    self.timeout, self.log_path = timeout, log_path

  def __call__(self, state, messages, batches):
    from cooperllm_jax.federated.clients import Uplink  # pylint: disable=g-import-not-at-top
    from cooperllm_jax.federated.round import Replies  # pylint: disable=g-import-not-at-top
    del batches   # each end device loads its own
    started, out, down = time.perf_counter(), {}, {}
    for i, c in enumerate(np.asarray(messages.clients).tolist()):
      node = self.nodes.get(c)
      if node is None:
        continue
      payload = wire.encode((state.trainable, messages.extra, messages.guide,
                             messages.clients[i:i + 1], messages.counts[i:i + 1], messages.lr))
      down[c] = wire.payload_bytes(payload)
      head = ConfigRecord({'round': messages.round_index, 'extras': len(messages.extra),
                           'guided': messages.guide is not None})
      out[node] = Message(RecordDict({'payload': payload, 'head': head}), dst_node_id=node,
                          message_type='train', group_id=str(messages.round_index))
    got = {}
    for reply in self.grid.send_and_receive(list(out.values()), timeout=self.timeout):
      if not reply.has_error():
        got[reply.metadata.src_node_id] = reply.content['reply']
    rows, up = [], {}
    for c in np.asarray(messages.clients).tolist():
      record = got.get(self.nodes.get(c))
      if record is not None:
        up[c] = wire.payload_bytes(record)
        record = wire.decode(record, (Uplink(0, 0, 0), 0))
      rows.append(record)
    with open(self.log_path, 'a') as f:
      f.write(json.dumps({'round': messages.round_index, 'down_bytes': down, 'up_bytes': up,
                          'seconds': time.perf_counter() - started}) + '\n')
    return Replies.collect(rows, self.steps, self.probes)


def discover(grid: Grid, count: int, timeout: float) -> dict:
  """{partition id: node id} of the end devices, once `count` of them are connected."""
  deadline = time.monotonic() + timeout
  while len(list(grid.get_node_ids())) < count and time.monotonic() < deadline:
    time.sleep(0.2)
  asks = [Message(RecordDict(), dst_node_id=n, message_type='query')
          for n in grid.get_node_ids()]
  nodes = {}
  for reply in grid.send_and_receive(asks, timeout=max(deadline - time.monotonic(), 1.0)):
    if not reply.has_error():
      nodes[int(reply.content['node']['partition-id'])] = reply.metadata.src_node_id
  return nodes


@server.main()
def edge(grid: Grid, context: Context) -> None:
  """The edge's run: the run loop with FlowerClients. Its log lines go to state-dir/edge.log (and
  stdout), its outcome to state-dir/edge.json: an error a user can fix is one line there, anything
  else also keeps its traceback in the log."""
  from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.errors import CooperError  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.run.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  rc = context.run_config
  state_dir = pathlib.Path(rc['state-dir'])
  status = {'ok': False, 'error': ''}
  with open(state_dir / EDGE_LOG, 'a') as out:
    def log(line: str) -> None:
      print(line, flush=True)
      out.write(line + '\n')
      out.flush()
    try:
      config = _config(rc)
      cfg = config_lib.parse(config)
      asked = time.perf_counter()
      nodes = discover(grid, int(rc['nodes']), float(rc['round-timeout']))
      log(f'edge: end devices {sorted(nodes)} connected and answered a query in '
          f'{time.perf_counter() - asked:.1f}s')
      clients = FlowerClients(grid, nodes, cfg.local_steps, cfg.zo.probes,
                              float(rc['round-timeout']), state_dir / WIRE_LOG)
      train_and_evaluate(config, rc['workdir'], resume=bool(rc['resume']), log=log,
                         run_clients=clients)
      status['ok'] = True
    except CooperError as e:
      status['error'] = str(e)
    except Exception as e:
      status['error'] = f'the edge failed: {type(e).__name__}: {e} (traceback in {out.name})'
      log(traceback.format_exc())
      raise
    finally:
      written = state_dir / f'.{STATUS}.tmp'   # whole or not at all: the launcher polls for it
      written.write_text(json.dumps(status) + '\n')
      written.replace(state_dir / STATUS)


@client.query()
def hello(msg: Message, context: Context) -> Message:
  """Which client's data this end device holds."""
  node = ConfigRecord({'partition-id': int(context.node_config['partition-id'])})
  return Message(RecordDict({'node': node}), reply_to=msg)


class EndDevice:
  """An end device's task and algorithm, rebuilt from the run config as the edge builds them."""

  def __init__(self, run_config, cache_dir: Optional[pathlib.Path]):
    import jax  # pylint: disable=g-import-not-at-top
    from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from cooperllm_jax.run import loop, sizes  # pylint: disable=g-import-not-at-top
    if cache_dir is not None:
      jax.config.update('jax_compilation_cache_dir', str(cache_dir))
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
      jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    self.cfg = config_lib.parse(_config(run_config))
    self.task, self.algorithm = loop.prepare(self.cfg)
    self.cfg = sizes.fit(self.cfg, self.task, self.algorithm, log=lambda _: None)
    self.state = self.algorithm.init(self.task.pre.params)

  def reply(self, client_id: int, head, payload):
    """(uplink [S, P, ...], losses [S]) of this client's local training on the round's message."""
    from cooperllm_jax.federated import client_data  # pylint: disable=g-import-not-at-top
    from cooperllm_jax.federated.round import Messages  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    r = int(head['round'])
    trainable, extra, guide, ids, counts, lr = wire.decode(
        payload, _template(self.state.trainable, int(head['extras']), bool(head['guided'])))
    if ids.tolist() != [client_id]:
      raise ValueError(f'end device of client {client_id} got the message of client {ids}')
    batches, _ = client_data.round_batches(
        self.task.arrays, self.task.labels, self.task.partition.clients, ids,
        steps=self.cfg.local_steps, batch_size=self.cfg.batch_size, seed=self.cfg.seed,
        round_index=r)
    replies = self.algorithm.run_clients(self.state._replace(trainable=trainable),
                                         Messages(r, ids, counts, lr, extra, guide), batches)
    return jax.tree.map(lambda x: x[0], replies.uplink), replies.losses[0]


@client.train()
def train(msg: Message, context: Context) -> Message:
  """One round of this end device's local training on the edge's message; its log line says what
  the process's start (imports, task, compiled programs) and the training took."""
  rc, me = context.run_config, int(context.node_config['partition-id'])
  r, started = msg.content['head']['round'], time.perf_counter()
  print(f'end device {me}: round {r}', flush=True)
  device = EndDevice(rc, pathlib.Path(rc['state-dir']) / CACHE)
  ready = time.perf_counter()
  row = device.reply(me, msg.content['head'], msg.content['payload'])
  print(f'end device {me}: round {r} replied (set-up {ready - started:.1f}s, training '
        f'{time.perf_counter() - ready:.1f}s)', flush=True)
  return Message(RecordDict({'reply': wire.encode(row)}), reply_to=msg)

"""`train_and_evaluate(config, workdir)`: one federated run, importable; flags live in experiments/.

Loads the model and data named by the config, partitions the data over simulated clients, runs the
rounds of the configured algorithm and writes to `workdir`: config.json, partition.npz,
metrics.jsonl (one line per round: accuracy, loss, bytes up/down, passes, client memory, wall time,
and the simulated wall clock of the configured devices, sim_round_s / sim_time_s: system/clock.py),
TensorBoard events (tb/), accuracy.png and summary.json. Returns the summary dict.

Reliability (issue 7): checkpoints/ (orbax, every `checkpoint_every` rounds; `resume=True` goes on
from the newest good one, bit for bit as if never interrupted), ledger/ (what the edge received each
round; experiments/replay.py rebuilds the model from it), simulated faults and robust aggregation
(federated/faults.py, zo.Aggregation), optional DP (federated/privacy.py) and the divergence guard.
"""

import functools
import hashlib
import json
import pathlib
import time

from typing import Callable, Optional

import jax
import numpy as np

from cooperllm_jax import data as data_lib
from cooperllm_jax import checkpoint as checkpoint_lib
from cooperllm_jax import workdir as workdir_lib
from cooperllm_jax.errors import CheckpointError, ConfigError, TrainingError
from cooperllm_jax.evaluation import evaluate
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated import mesh as mesh_lib
from cooperllm_jax.federated import faults as faults_lib
from cooperllm_jax.federated import ledger as ledger_lib
from cooperllm_jax.federated.accounting import DownlinkTracker
from cooperllm_jax.federated.algorithms import ALGORITHMS, make_algorithm, robustness
from cooperllm_jax.models import count_params, load_pretrained
from cooperllm_jax.reporting import MetricWriter, NullWriter, to_json, truncate_metrics
from cooperllm_jax.system import clock as clock_lib
from cooperllm_jax.system import profiles as profiles_lib

DTYPES = ('float32', 'bfloat16', 'float16')


def validate(config) -> None:
  """One-line ConfigErrors for values that would otherwise fail deep inside JAX or silently."""
  positive = ('num_clients', 'clients_per_round', 'rounds', 'local_steps', 'batch_size',
              'max_length', 'eval_batch_size', 'client_chunk', 'eval_every')
  for name in positive:
    if int(config[name]) < 1:
      raise ConfigError(f'{name} must be >= 1, got {config[name]}')
  # Value checks (to move into the typed config): rates finite and > 0, seed >= 0, known dtypes.
  for name, rate in (('learning_rate', config.learning_rate),
                     ('cloud.learning_rate', config.cloud.learning_rate)):
    if not 0 < rate < float('inf'):
      raise ConfigError(f'{name} must be finite and > 0, got {rate}')
  if int(config.seed) < 0:
    raise ConfigError(f'seed must be >= 0, got {config.seed}')
  for name in ('dtype', 'param_dtype'):
    if config[name] not in DTYPES:
      raise ConfigError(f'{name} {config[name]!r} is not supported; choose one of '
                        f'{", ".join(DTYPES)}')
  if not config.weight_decay >= 0:
    raise ConfigError(f'weight_decay must be >= 0, got {config.weight_decay}')
  if not config.dirichlet_alpha > 0:
    raise ConfigError(f'dirichlet_alpha must be > 0, got {config.dirichlet_alpha}')
  for name in ('test_fraction', 'public_fraction'):
    if not 0 <= config[name] < 1:
      raise ConfigError(f'{name} must be in [0, 1), got {config[name]}')
  if int(config.get('checkpoint_every', 0)) < 0:
    raise ConfigError(f'checkpoint_every must be >= 0 (0 = off), got {config.checkpoint_every}')
  if int(config.get('keep_checkpoints', 1)) < 1:
    raise ConfigError(f'keep_checkpoints must be >= 1, got {config.keep_checkpoints}')
  robustness(config)                          # aggregation, faults and dp fields
  faults_lib.DivergenceGuard.from_config(config)
  if config.clients_per_round > config.num_clients:
    raise ConfigError(f'clients_per_round={config.clients_per_round} exceeds '
                      f'num_clients={config.num_clients}')
  if config.algorithm not in ALGORITHMS:
    raise ConfigError(f'unknown algorithm {config.algorithm!r}; choose one of {", ".join(ALGORITHMS)}')
  system = config.system
  profiles = profiles_lib.load_profiles(system.profiles or None)
  profiles_lib.pick(profiles, system.cloud, 'cloud')
  profiles_lib.pick(profiles, system.edge, 'edge')
  clock_lib.client_devices(system.clients, profiles, config.num_clients, config.seed)


def load_task(config):
  """(pretrained model, dataset, tokenized arrays, partition) for a config."""
  dataset = data_lib.load_dataset(config.dataset)
  pre = load_pretrained(config.model, num_labels=dataset.num_classes,
                        label_words=list(config.label_words or dataset.label_names),
                        dtype=config.dtype, param_dtype=config.param_dtype, pooling=config.pooling,
                        seed=config.seed)
  pre.check_max_length(config.max_length)
  suffix = config.prompt_suffix if pre.is_decoder else None
  arrays = data_lib.tokenize_texts(pre.tokenizer, dataset.texts, max_length=config.max_length,
                                   pad_id=pre.pad_id, suffix=suffix)
  partition = data_lib.make_partition(
      dataset.labels, num_clients=config.num_clients, scheme=config.partition,
      alpha=config.dirichlet_alpha, test_fraction=config.test_fraction,
      public_fraction=config.public_fraction, min_client_size=config.min_client_size,
      seed=config.seed)
  return pre, dataset, arrays, partition


def task_algorithm(config, pre, dataset, arrays, partition):
  """The configured algorithm for a loaded task (cooperllm's cloud gets the public slice)."""
  public = None
  if config.algorithm == 'cooperllm':
    c = config.cloud
    public = client_data.public_set(arrays, dataset.labels, partition.public,
                                    examples=c.public_examples, classes=tuple(c.public_classes),
                                    shuffle_labels=c.shuffle_labels, seed=config.seed)
  return make_algorithm(config, pre.model, public)


def check_resumable(workdir, config) -> pathlib.Path:
  """A workdir holding a run of this config (fast: before any model or data is loaded)."""
  path = pathlib.Path(workdir)
  try:
    saved = json.loads((path / 'config.json').read_text())
  except (OSError, ValueError):
    raise CheckpointError(f'cannot resume: {path} holds no run (no readable config.json)') from None
  diffs = checkpoint_lib.config_differences(
      {k: v for k, v in saved.items() if k not in checkpoint_lib.NOT_TRAINING},
      checkpoint_lib.training_config(config))
  if diffs:
    raise CheckpointError('cannot resume: the config differs from the run in the workdir in '
                          + '; '.join(diffs[:4]) + (' ...' if len(diffs) > 4 else ''))
  return path


def data_fingerprint(arrays, labels, partition) -> str:
  """sha256 of what the clients and the test see: tokens, labels and the partition."""
  h = hashlib.sha256()
  for x in (arrays['input_ids'], arrays['attention_mask'], labels, partition.public,
            partition.test, *partition.clients):
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def train_and_evaluate(config, workdir, overwrite: bool = False, log=print,
                       progress: Optional[Callable] = None, resume: bool = False) -> dict:
  """Runs config in workdir; `progress(iterable)` may wrap the rounds (e.g. tqdm). resume=True
  continues the run in workdir from its newest good checkpoint (same training config required)."""
  validate(config)
  if resume and overwrite:
    raise ConfigError('--resume continues the run in the workdir and --overwrite replaces it: '
                      'pass one of them')
  primary = jax.process_index() == 0  # a multi-process run: all compute, process 0 writes
  if resume:
    workdir = check_resumable(workdir, config)
  else:
    workdir = workdir_lib.check(workdir, overwrite) if primary else pathlib.Path(workdir)
  pre, dataset, arrays, partition = load_task(config)  # user errors surface before any write
  algorithm = task_algorithm(config, pre, dataset, arrays, partition)
  if primary and not resume:
    workdir_lib.prepare(workdir)
    (workdir / 'config.json').write_text(config.to_json(indent=2))
    partition.save(workdir / 'partition.npz')
  model = pre.model
  state = algorithm.init(pre.params)
  guard = faults_lib.DivergenceGuard.from_config(config)
  privacy = getattr(algorithm, 'privacy', None)
  store = checkpoint_lib.RunStore(workdir, config, {
      'config': checkpoint_lib.training_config(config), 'seed': config.seed,
      'base_sha256': checkpoint_lib.tree_sha256(pre.params),
      'data_sha256': data_fingerprint(arrays, dataset.labels, partition)}, log)
  ledger = store.ledger if primary else None
  log(f'{config.algorithm}: model {config.model} ({count_params(pre.params) / 1e6:.1f}M params, '
      f'{algorithm.dense_bytes(state) / 4 / 1e6:.3g}M trainable); dataset {dataset.name}: '
      f'{len(dataset)} examples, {dataset.num_classes} classes; {partition.num_clients} clients, '
      f'{len(partition.public)} public, {len(partition.test)} test')
  labels = dataset.labels
  shapes = client_data.round_shapes(arrays, config.local_steps, config.batch_size)
  client_memory = algorithm.client_memory(state, shapes)['peak_bytes']
  clock = clock_lib.SimulatedClock.from_config(config, model,
                                               state.get('trainable', state.get('params')))
  if config.algorithm == 'cooperllm' and config.zgr.guidance_format == 'link':
    algorithm.link_budget = clock.guidance_budget   # DTC sized by the simulated links
  small = min(clock.devices, key=lambda d: d.memory_bytes)
  if client_memory > small.memory_bytes:
    log(f'warning: a client step needs {client_memory / 2**20:.0f} MiB, more than the '
        f'{small.memory_gib:g} GiB of device profile {small.name!r}')
  downlink = DownlinkTracker(partition.num_clients, algorithm.dense_bytes(state),
                             algorithm.sync_bytes)
  releases = np.zeros(partition.num_clients, np.int64)  # uploads per client (DP accounting)
  done, seconds_before = 0, 0.0
  if resume:
    done, state, good, meta = store.restore(state, guard is not None)
    if guard is not None:
      guard.load(good, meta['guard'])
    downlink.load(meta['downlink'])
    releases = np.asarray(meta['releases'], np.int64)
    seconds_before = meta['train_seconds']
    clock.elapsed = meta.get('sim_time_s', 0.0)
    before = meta['before']   # the starting model's, kept with the checkpoint
    if primary and len(truncate_metrics(workdir / 'metrics.jsonl', done)) < done + 1:
      log(f'warning: {workdir / "metrics.jsonl"} lacks rows of rounds 0..{done}')
    log(f'resuming after round {done} (checkpoint in {workdir / "checkpoints"})')
  else:
    before = evaluate(model, algorithm.model_params(state), arrays, labels, partition.test,
                      config.eval_batch_size)
    log(f'round 0: test accuracy {before["accuracy"]:.4f} loss {before["loss"]:.4f}')
    if ledger is not None:
      ledger.start({'algorithm': config.algorithm, 'seed': config.seed,
                    'replayable': config.algorithm != 'fedavg_bp',
                    'base_trainable_sha256': checkpoint_lib.tree_sha256(
                        state.get('trainable', state.get('params')))})
  if guard is not None:
    guard.reference = before['loss']
  start = time.perf_counter()
  rounds = range(done + 1, config.rounds + 1)
  title = f'{config.algorithm} on {dataset.name} with {config.model}'
  row = {}
  with (MetricWriter(workdir, title=title, tensorboard=config.tensorboard) if primary
        else NullWriter()) as writer:
    if not resume:
      writer.write({'round': 0, 'test_accuracy': before['accuracy'], 'test_loss': before['loss'],
                    'sim_time_s': 0.0})
    for r in (progress(rounds) if progress else rounds):
      t0 = time.perf_counter()
      sampled = client_data.sample_clients(partition.num_clients, config.clients_per_round,
                                           config.seed, r)
      load = functools.partial(client_data.round_batches, arrays, labels, partition.clients,
                               steps=config.local_steps, batch_size=config.batch_size,
                               seed=config.seed, round_index=r)
      # On a mesh, each process loads only the clients its devices train.
      batches, counts = mesh_lib.host_local_batches(getattr(algorithm, 'mesh', None), sampled,
                                                    load)
      sync_bytes = downlink.download(sampled, r)
      lr = np.float32(state['lr'])
      entering = faults_lib.copy_state(state) if guard is not None else None
      state, result = algorithm.run_round(state, batches, counts, sampled, r)
      guide = state.get('guidance')  # the round's, before a rollback replaces the state
      downlink.record(r, result.broadcast_bytes)
      bytes_down = sync_bytes + result.guidance_bytes
      sent = result.sent if result.sent is not None else np.ones(len(sampled), bool)
      probes = (np.zeros(len(sampled), np.int64) if result.uplink is None else
                (np.asarray(result.uplink.weights) != 0).reshape(len(sampled), -1).sum(1))
      sim_round = clock.tick(clock.plan(
          r, sampled, result.forwards, result.backwards, result.uplink_bytes, sync_bytes, sent,
          probes, result.client_weights > 0, result.metrics.get('guidance_formats')))
      arrived = result.client_weights > 0  # the edge only hears the losses of these clients
      train_loss = float(np.mean(result.losses[arrived])) if arrived.any() else None
      verdict = ledger_lib.GUARD_NONE
      if guard is not None:
        state, rolled_back = guard.after_round(entering, state, train_loss, r)
        if rolled_back or train_loss is not None:
          verdict = ledger_lib.GUARD_ROLLED_BACK if rolled_back else ledger_lib.GUARD_ACCEPTED
      elif train_loss is not None and not np.isfinite(train_loss):
        raise TrainingError(f'training loss is {train_loss} in round {r}; lower learning_rate '
                            f'(now {lr:g}) or set guard.spike to roll back instead')
      releases[sampled[result.sent]] += 1
      row = {'round': r, 'bytes_up': int(result.uplink_bytes.sum()),
             'bytes_down': int(bytes_down.sum()),
             'bytes_up_per_client': float(result.uplink_bytes.mean()),
             'bytes_down_per_client': float(bytes_down.mean()),
             'forwards': int(result.forwards.sum()), 'backwards': int(result.backwards.sum()),
             'client_memory_bytes': client_memory, 'clients': sampled.tolist(),
             'learning_rate': float(lr), 'sim_round_s': sim_round, 'sim_time_s': clock.elapsed,
             **result.metrics}
      if train_loss is not None:
        row['train_loss'] = train_loss
      if verdict == ledger_lib.GUARD_ROLLED_BACK:
        row['rollback'] = True
        log(f'round {r}: train loss {train_loss:.4g} spiked; rolled back, learning rate '
            f'{float(state["lr"]):g}')
      if privacy is not None:
        row['dp_epsilon'] = privacy.epsilon(int(releases.max()))
      if r % config.eval_every == 0 or r == config.rounds:
        ev = evaluate(model, algorithm.model_params(state), arrays, labels, partition.test,
                      config.eval_batch_size)
        row.update(test_accuracy=ev['accuracy'], test_loss=ev['loss'])
      row['wall_s'] = time.perf_counter() - t0
      writer.write(row)
      if ledger is not None and result.uplink is not None:
        ledger.append(r, sampled, result, lr, guide, verdict)
      if store.due(r, config.rounds):
        store.save(r, state, guard.good if guard is not None else None, {
            'downlink': downlink.to_json(), 'releases': releases.tolist(),
            'guard': guard.to_json() if guard is not None else None,
            'train_seconds': seconds_before + time.perf_counter() - start,
            'sim_time_s': clock.elapsed, 'before': before})
      log(f'round {r}: train loss {row.get("train_loss", float("nan")):.4f}'
          + (f', test accuracy {row["test_accuracy"]:.4f}' if 'test_accuracy' in row else '')
          + f', {row["bytes_up_per_client"]:.0f} B up / {row["bytes_down_per_client"]:.0f} B down'
          + f' per client ({row["wall_s"]:.1f}s)')
  if 'test_accuracy' not in row:  # resumed after the last round: nothing ran, evaluate again
    ev = evaluate(model, algorithm.model_params(state), arrays, labels, partition.test,
                  config.eval_batch_size)
    row = {'test_accuracy': ev['accuracy']}
  summary = {'algorithm': config.algorithm, 'model': config.model, 'dataset': dataset.name,
             'rounds': config.rounds, 'accuracy_before': before['accuracy'],
             'accuracy_after': row['test_accuracy'], 'test_examples': before['examples'],
             'train_seconds': seconds_before + time.perf_counter() - start,
             'client_memory_bytes': client_memory, 'sim_time_s': clock.elapsed,
             'system': {'clients': config.system.clients, 'edge': config.system.edge,
                        'cloud': config.system.cloud, 'pipelined': bool(config.system.pipelined)},
             'backend': jax.default_backend()}
  if primary:
    (workdir / 'summary.json').write_text(to_json(summary, indent=2))
  return summary

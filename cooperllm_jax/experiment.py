"""`train_and_evaluate(config, workdir)`: one federated run, importable; flags live in experiments/.

Loads the model and data named by the config, partitions the data over simulated clients, runs the
rounds of the configured algorithm and writes to `workdir`: config.json, partition.npz,
metrics.jsonl (one line per round: accuracy, loss, bytes up/down, passes, client memory, wall time),
TensorBoard events (tb/), accuracy.png and summary.json. Returns the summary dict.
"""

import json
import pathlib
import shutil
import time

from typing import Callable, Optional

import jax
import numpy as np

from cooperllm_jax import data as data_lib
from cooperllm_jax.errors import ConfigError, TrainingError
from cooperllm_jax.evaluation import evaluate
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated.accounting import DownlinkTracker
from cooperllm_jax.federated.algorithms import ALGORITHMS, make_algorithm
from cooperllm_jax.models import count_params, load_pretrained
from cooperllm_jax.reporting import MetricWriter



def validate(config) -> None:
  """One-line ConfigErrors for values that would otherwise fail deep inside JAX or silently."""
  positive = ('num_clients', 'clients_per_round', 'rounds', 'local_steps', 'batch_size',
              'max_length', 'eval_batch_size', 'client_chunk')
  for name in positive:
    if int(config[name]) < 1:
      raise ConfigError(f'{name} must be >= 1, got {config[name]}')
  if not config.learning_rate > 0:
    raise ConfigError(f'learning_rate must be > 0, got {config.learning_rate}')
  if config.clients_per_round > config.num_clients:
    raise ConfigError(f'clients_per_round={config.clients_per_round} exceeds '
                      f'num_clients={config.num_clients}')
  if config.algorithm not in ALGORITHMS:
    raise ConfigError(f'unknown algorithm {config.algorithm!r}; choose one of {", ".join(ALGORITHMS)}')


def check_workdir(workdir, overwrite: bool) -> pathlib.Path:
  """An existing non-empty workdir is an error unless `overwrite`; nothing is touched here."""
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise ConfigError(f'workdir {path} exists and is not a directory')
  if path.exists() and any(path.iterdir()):
    if not overwrite:
      raise ConfigError(f'workdir {path} is not empty; pass --overwrite to replace it')
    if not (path / 'config.json').exists():
      raise ConfigError(f'workdir {path} holds no config.json, so it is not a run of ours; '
                        'refusing to delete it even with --overwrite')
  return path


def prepare_workdir(path: pathlib.Path) -> pathlib.Path:
  """Clears (after check_workdir allowed it) and creates the workdir."""
  if path.exists():
    shutil.rmtree(path)
  path.mkdir(parents=True)
  return path


def load_task(config):
  """(pretrained model, dataset, tokenized arrays, partition) for a config."""
  dataset = data_lib.load_dataset(config.dataset)
  pre = load_pretrained(config.model, num_labels=dataset.num_classes,
                        label_words=list(config.label_words or dataset.label_names),
                        dtype=config.dtype, param_dtype=config.param_dtype, pooling=config.pooling,
                        seed=config.seed)
  suffix = config.prompt_suffix if pre.is_decoder else None
  arrays = data_lib.tokenize_texts(pre.tokenizer, dataset.texts, max_length=config.max_length,
                                   pad_id=pre.pad_id, suffix=suffix)
  partition = data_lib.make_partition(
      dataset.labels, num_clients=config.num_clients, scheme=config.partition,
      alpha=config.dirichlet_alpha, test_fraction=config.test_fraction,
      public_fraction=config.public_fraction, min_client_size=config.min_client_size,
      seed=config.seed)
  return pre, dataset, arrays, partition


def train_and_evaluate(config, workdir, overwrite: bool = False, log=print,
                       progress: Optional[Callable] = None) -> dict:
  """Runs config in workdir; `progress(iterable)` may wrap the rounds (e.g. tqdm)."""
  validate(config)
  workdir = check_workdir(workdir, overwrite)
  pre, dataset, arrays, partition = load_task(config)  # user errors surface before any write
  public = None
  if config.algorithm == 'cooperllm':
    c = config.cloud
    public = client_data.public_set(arrays, dataset.labels, partition.public,
                                    examples=c.public_examples, classes=tuple(c.public_classes),
                                    shuffle_labels=c.shuffle_labels, seed=config.seed)
  algorithm = make_algorithm(config, pre.model, public)
  prepare_workdir(workdir)
  (workdir / 'config.json').write_text(config.to_json(indent=2))
  partition.save(workdir / 'partition.npz')
  model = pre.model
  state = algorithm.init(pre.params)
  log(f'{config.algorithm}: model {config.model} ({count_params(pre.params) / 1e6:.1f}M params, '
      f'{algorithm.dense_bytes(state) / 4 / 1e6:.3g}M trainable); dataset {dataset.name}: '
      f'{len(dataset)} examples, {dataset.num_classes} classes; {partition.num_clients} clients, '
      f'{len(partition.public)} public, {len(partition.test)} test')
  labels = dataset.labels
  shapes = client_data.round_shapes(arrays, config.local_steps, config.batch_size)
  client_memory = algorithm.client_memory(state, shapes)['peak_bytes']
  downlink = DownlinkTracker(partition.num_clients, algorithm.dense_bytes(state),
                             algorithm.sync_bytes)
  before = evaluate(model, algorithm.model_params(state), arrays, labels, partition.test,
                    config.eval_batch_size)
  log(f'round 0: test accuracy {before["accuracy"]:.4f} loss {before["loss"]:.4f}')
  start = time.perf_counter()
  rounds = range(1, config.rounds + 1)
  with MetricWriter(workdir, title=f'{config.algorithm} on {dataset.name} with {config.model}',
                    tensorboard=config.tensorboard) as writer:
    writer.write({'round': 0, 'test_accuracy': before['accuracy'], 'test_loss': before['loss']})
    for r in (progress(rounds) if progress else rounds):
      t0 = time.perf_counter()
      sampled = client_data.sample_clients(partition.num_clients, config.clients_per_round,
                                           config.seed, r)
      batches, counts = client_data.round_batches(arrays, labels, partition.clients, sampled,
                                                  config.local_steps, config.batch_size,
                                                  config.seed, r)
      bytes_down = downlink.download(sampled, r)
      state, result = algorithm.run_round(state, batches, counts, sampled, r)
      downlink.record(r, result.broadcast_bytes)
      bytes_down = bytes_down + result.guidance_bytes
      row = {'round': r, 'train_loss': float(np.mean(result.losses)),
             'bytes_up': int(result.uplink_bytes.sum()), 'bytes_down': int(bytes_down.sum()),
             'bytes_up_per_client': float(result.uplink_bytes.mean()),
             'bytes_down_per_client': float(bytes_down.mean()),
             'forwards': int(result.forwards.sum()), 'backwards': int(result.backwards.sum()),
             'client_memory_bytes': client_memory, 'clients': sampled.tolist(),
             **result.metrics}
      if not np.isfinite(row['train_loss']):
        raise TrainingError(f'training loss is {row["train_loss"]} in round {r}; lower '
                            f'learning_rate (now {config.learning_rate})')
      if r % config.eval_every == 0 or r == config.rounds:
        ev = evaluate(model, algorithm.model_params(state), arrays, labels, partition.test,
                      config.eval_batch_size)
        row.update(test_accuracy=ev['accuracy'], test_loss=ev['loss'])
      row['wall_s'] = time.perf_counter() - t0
      writer.write(row)
      log(f'round {r}: train loss {row["train_loss"]:.4f}'
          + (f', test accuracy {row["test_accuracy"]:.4f}' if 'test_accuracy' in row else '')
          + f', {row["bytes_up_per_client"]:.0f} B up / {row["bytes_down_per_client"]:.0f} B down'
          + f' per client ({row["wall_s"]:.1f}s)')
  summary = {'algorithm': config.algorithm, 'model': config.model, 'dataset': dataset.name,
             'rounds': config.rounds, 'accuracy_before': before['accuracy'],
             'accuracy_after': row['test_accuracy'], 'test_examples': before['examples'],
             'train_seconds': time.perf_counter() - start, 'client_memory_bytes': client_memory,
             'backend': jax.default_backend()}
  (workdir / 'summary.json').write_text(json.dumps(summary, indent=2))
  return summary

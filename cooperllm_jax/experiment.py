"""`train_and_evaluate(config, workdir)`: one federated run, importable; flags live in experiments/.

Loads the model and data named by the config, partitions the data over simulated clients, runs the
rounds and writes to `workdir`: config.json, partition.npz, metrics.jsonl (one line per round) and
summary.json. Returns the summary dict.
"""

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cooperllm_jax import data as data_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.evaluation import evaluate
from cooperllm_jax.federated import client_data, fedavg_bp
from cooperllm_jax.models import count_params, load_pretrained

ALGORITHMS = ('fedavg_bp',)


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


def train_and_evaluate(config, workdir, overwrite: bool = False, log=print) -> dict:
  validate(config)
  workdir = check_workdir(workdir, overwrite)
  pre, dataset, arrays, partition = load_task(config)  # user errors surface before any write
  prepare_workdir(workdir)
  (workdir / 'config.json').write_text(config.to_json(indent=2))
  partition.save(workdir / 'partition.npz')
  model, params = pre.model, pre.params
  log(f'model {config.model}: {count_params(params) / 1e6:.1f}M params; dataset {dataset.name}: '
      f'{len(dataset)} examples, {dataset.num_classes} classes; {partition.num_clients} clients, '
      f'{len(partition.public)} public, {len(partition.test)} test')

  optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  round_fn = fedavg_bp.make_round(fedavg_bp.make_client_update(model, optimizer),
                                  chunk=config.client_chunk)
  labels = dataset.labels
  before = evaluate(model, params, arrays, labels, partition.test, config.eval_batch_size)
  log(f'round 0: test accuracy {before["accuracy"]:.4f} loss {before["loss"]:.4f}')
  start = time.perf_counter()
  with open(workdir / 'metrics.jsonl', 'w') as metrics_file:
    for r in range(1, config.rounds + 1):
      t0 = time.perf_counter()
      sampled = client_data.sample_clients(partition.num_clients, config.clients_per_round,
                                           config.seed, r)
      batches, counts = client_data.round_batches(arrays, labels, partition.clients, sampled,
                                                  config.local_steps, config.batch_size,
                                                  config.seed, r)
      params, losses = round_fn(params, jax.tree.map(jnp.asarray, batches), jnp.asarray(counts))
      row = {'round': r, 'train_loss': float(jnp.mean(losses)), 'clients': sampled.tolist()}
      if r % config.eval_every == 0 or r == config.rounds:
        ev = evaluate(model, params, arrays, labels, partition.test, config.eval_batch_size)
        row.update(test_accuracy=ev['accuracy'], test_loss=ev['loss'])
      row['wall_s'] = time.perf_counter() - t0
      metrics_file.write(json.dumps(row) + '\n')
      metrics_file.flush()
      log(f'round {r}: train loss {row["train_loss"]:.4f}'
          + (f', test accuracy {row["test_accuracy"]:.4f}' if 'test_accuracy' in row else '')
          + f' ({row["wall_s"]:.1f}s)')
  summary = {'algorithm': config.algorithm, 'model': config.model, 'dataset': dataset.name,
             'rounds': config.rounds, 'accuracy_before': before['accuracy'],
             'accuracy_after': row['test_accuracy'], 'test_examples': before['examples'],
             'train_seconds': time.perf_counter() - start,
             'backend': jax.default_backend()}
  (workdir / 'summary.json').write_text(json.dumps(summary, indent=2))
  return summary

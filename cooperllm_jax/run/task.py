"""A run's task: the pretrained model, the tokenized dataset, its partition over the simulated
clients, the cloud's public slice, and each round's client batches."""

import dataclasses
import functools
import hashlib
from typing import Any, Optional

import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax import data as data_lib
from cooperllm_jax import mesh as mesh_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import client_data
from cooperllm_jax.models import load_pretrained


@dataclasses.dataclass
class Task:
  pre: Any                      # models.Pretrained: model, params, tokenizer
  dataset: Any                  # data.Dataset
  arrays: dict                  # tokenized {input_ids, attention_mask}
  partition: Any                # data.Partition
  public: Optional[dict] = None  # the cloud's public examples, for algorithms that need them

  @property
  def model(self):
    return self.pre.model

  @property
  def labels(self) -> np.ndarray:
    return self.dataset.labels

  def round_inputs(self, cfg: config_lib.RunConfig, round_index: int, mesh=None):
    """(sampled client ids, batches {name: [C, S, B, ...]}, counts [C]) of a round; on a mesh each
    process loads only the clients its devices train."""
    sampled = client_data.sample_clients(self.partition.num_clients, cfg.clients_per_round,
                                         cfg.seed, round_index)
    load = functools.partial(client_data.round_batches, self.arrays, self.labels,
                             self.partition.clients, steps=cfg.local_steps,
                             batch_size=cfg.batch_size, seed=cfg.seed, round_index=round_index)
    return (sampled,) + tuple(mesh_lib.host_local_batches(mesh, sampled, load))

  def fingerprint(self) -> str:
    """sha256 of what the clients and the test see: tokens, labels and the partition."""
    h = hashlib.sha256()
    p = self.partition
    for x in (self.arrays['input_ids'], self.arrays['attention_mask'], self.labels, p.public,
              p.test, *p.clients, p.validation):
      h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def load_task(cfg: config_lib.RunConfig, needs_public: bool = False) -> Task:
  """The task of a run config; needs_public: also cut the cloud's public set (config.Cloud)."""
  m, d = cfg.model, cfg.data
  dataset = data_lib.load_dataset(d.dataset, **d.file_options)
  pre = load_pretrained(m.name, num_labels=dataset.num_classes,
                        label_words=list(m.label_words or dataset.label_names),
                        dtype=m.dtype, param_dtype=m.param_dtype, pooling=m.pooling,
                        seed=cfg.seed)
  suffix = m.prompt_suffix if pre.is_decoder else None
  arrays = pre.tokenize(dataset.texts, max_length=d.max_length, suffix=suffix)
  partition = data_lib.make_partition(
      dataset.labels, num_clients=d.num_clients, scheme=d.partition, alpha=d.dirichlet_alpha,
      test_fraction=d.test_fraction, public_fraction=d.public_fraction,
      validation_fraction=d.validation_fraction, min_client_size=d.min_client_size,
      seed=cfg.seed)
  public = None
  if needs_public:
    c = cfg.cloud
    if c.public_dataset:
      public_arrays, public_labels = _other_public(c.public_dataset, dataset, pre,
                                                   d.max_length, suffix)
      pool = np.arange(len(public_labels))
    else:
      public_arrays, public_labels, pool = arrays, dataset.labels, partition.public
    public = client_data.public_set(public_arrays, public_labels, pool,
                                    examples=c.public_examples, classes=tuple(c.public_classes),
                                    shuffle_labels=c.shuffle_labels, seed=cfg.seed)
  return Task(pre, dataset, arrays, partition, public)


def _other_public(names: str, private, pre, max_length: int, suffix) -> tuple[dict, np.ndarray]:
  """The tokenized examples of the '+'-joined datasets in cloud.public_dataset, whose label ids
  must mean what the private dataset's do (same number of classes; e.g. VADER's negative/positive
  for Rotten Tomatoes' rotten/fresh)."""
  parts = [data_lib.load_dataset(n) for n in names.split('+')]
  for part in parts:
    if part.num_classes != private.num_classes:
      raise ConfigError(f'cloud.public_dataset {part.name} has {part.num_classes} classes '
                        f'{list(part.label_names)}, the clients\' {private.name} '
                        f'{private.num_classes} {list(private.label_names)}')
  texts = [t for part in parts for t in part.texts]
  return pre.tokenize(texts, max_length=max_length, suffix=suffix), np.concatenate(
      [part.labels for part in parts])

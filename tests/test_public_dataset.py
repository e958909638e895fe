"""The cloud's public set from other datasets (cloud.public_dataset) and the validation split: the
public examples are exactly the named datasets' texts, the clients' data is untouched, and
inconsistent settings fail before any work."""

import numpy as np
import pytest

from cooperllm_jax import config as config_lib
from cooperllm_jax.data import load_dataset
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.run.task import load_task
from experiments.configs import demo


def _config(**changes):
  c = demo.get_config('cooperllm')
  c.dataset, c.num_clients, c.clients_per_round = 'rotten_tomatoes', 20, 4
  c.public_fraction, c.validation_fraction = 0.0, 0.05
  c.cloud.public_dataset, c.cloud.public_examples = 'vader_amazon+vader_tweets', 64
  for k, v in changes.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config_lib.parse(c)


def test_public_set_comes_from_the_named_datasets():
  task = load_task(_config(), needs_public=True)
  public = task.public
  assert public['input_ids'].shape == (64, 32) and len(public['labels']) == 64
  # Every public example is a tokenized VADER snippet, none a review the clients hold.
  vader = [t for n in ('vader_amazon', 'vader_tweets') for t in load_dataset(n).texts]
  from cooperllm_jax.data import tokenize_texts  # pylint: disable=g-import-not-at-top
  ids = tokenize_texts(task.pre.tokenizer, vader, max_length=32, pad_id=task.pre.pad_id)
  rows = {r.tobytes() for r in ids['input_ids']}
  assert all(r.tobytes() in rows for r in public['input_ids'])
  clients = {r.tobytes() for r in task.arrays['input_ids']}
  assert sum(r.tobytes() in clients for r in public['input_ids']) <= 2  # a shared short phrase
  assert set(public['labels'].tolist()) == {0, 1}
  p = task.partition
  assert len(p.public) == 0 and len(p.validation) == round(0.05 * 5405) + round(0.05 * 7403)
  held = np.concatenate([*p.clients, p.test, p.validation])
  assert len(np.unique(held)) == len(task.labels)


@pytest.mark.parametrize('changes, needle', [
    (dict(public_fraction=0.05), 'set public_fraction=0'),
    (dict(validation_fraction=0.85), 'validation_fraction must be < 1'),
    (dict(validation_fraction=-0.1), 'validation_fraction must be in'),
])
def test_inconsistent_settings(changes, needle):
  with pytest.raises(ConfigError, match=needle):
    _config(**changes)


def test_public_dataset_with_other_classes_is_refused():
  with pytest.raises(ConfigError, match='trec has 6 classes'):
    load_task(_config(**{'cloud.public_dataset': 'vader_amazon+trec'}), needs_public=True)

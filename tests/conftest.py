"""Shared test set-up: offline hubs, float32 matmuls, and real-asset fixtures loaded once."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def minilm():
  from cooperllm_jax.models.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
  return load_pretrained('minilm', num_labels=5, pooling='pooler')


@pytest.fixture(scope='session')
def smollm2():
  from cooperllm_jax.models.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
  return load_pretrained('smollm2', label_words=['business', 'entertainment', 'politics',
                                                 'sport', 'tech'])

"""Datasets, federated partitions and tokenization."""

from cooperllm_jax.data.dataset import TextDataset
from cooperllm_jax.data.partition import Partition, make_partition
from cooperllm_jax.data.sources import load_bbc_news, load_dataset, load_local
from cooperllm_jax.data.tokenize import default_cache_dir, tokenize_texts

__all__ = [
    'Partition',
    'TextDataset',
    'default_cache_dir',
    'load_bbc_news',
    'load_dataset',
    'load_local',
    'make_partition',
    'tokenize_texts',
]

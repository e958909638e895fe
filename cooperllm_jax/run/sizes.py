"""Sizes a config asks for that the data or the model cannot give, settled before the workdir is
touched: a training size past them is refused in one line (the run would not be the one its
config.json describes, and such sizes end in out-of-memory errors), an evaluation batch past the
largest split evaluated is clamped to it with a log line (the results are the same: `evaluate`
pads a short batch with weight 0)."""

import dataclasses
import math
from typing import Callable

import jax

from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import ConfigError


def trained_weights(cfg: config_lib.RunConfig, params) -> int:
  """d: how many weights the clients train (zo.trainable's subset of `params`), from shapes alone:
  nothing is allocated, and a LoRA target the model lacks is refused here."""
  trainable = jax.eval_shape(lambda p, key: cfg.zo.subset.split(p, key)[0], params,
                             jax.random.key(0))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(trainable))


def fit(cfg: config_lib.RunConfig, task, algorithm, log: Callable[[str], None]):
  """`cfg` with its sizes checked against `task` (run/task.py) and `algorithm`: raises a
  ConfigError for a client batch larger than every client's data or a guidance pool larger than
  the trained weights; returns it with eval_batch_size clamped to the largest evaluated split."""
  held = sorted(len(c) for c in task.partition.clients)
  if cfg.batch_size > held[-1]:
    raise ConfigError(f'batch_size={cfg.batch_size} exceeds every client\'s data (the largest of '
                      f'the {len(held)} clients holds {held[-1]} examples): lower batch_size')
  short = sum(n < cfg.batch_size for n in held)
  if short:
    log(f'batch_size={cfg.batch_size}: {short} of the {len(held)} clients hold fewer examples '
        f'(the fewest {held[0]}), so their batches repeat examples')
  d = trained_weights(cfg, task.pre.params)
  guidance = algorithm.costs.guidance
  if guidance is not None and guidance.pool_size > d:
    raise ConfigError(f'zgr.pool_size={guidance.pool_size} exceeds the {d} weights the clients '
                      f'train (zo.trainable={cfg.zo.trainable}): at most {d} directions are '
                      'independent; lower zgr.pool_size')
  split = max(len(task.partition.test), len(task.partition.validation))
  if cfg.eval_batch_size > split:
    log(f'eval_batch_size={cfg.eval_batch_size} clamped to {split}, the largest split evaluated')
    cfg = dataclasses.replace(cfg, eval_batch_size=split)
  return cfg

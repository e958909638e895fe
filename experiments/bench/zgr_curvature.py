r"""Is ZGR's default lr_V = 0.1 inside the stable range on real models? The step along V is a
gradient-descent step of rate lr_V within the cloud's subspace (zoo/guided.py), stable when
lr_V < 2 / L_V, L_V the private loss's curvature along the cloud's direction.

  python -m experiments.bench.zgr_curvature --settings=bbc_minilm_lora,rt_shifted_minilm_lora \
      --trainable=head,bitfit,lora,full

For each benchmark setting (experiments/benchmark_settings.py) and trainable subset, at the pretrained
model (random head) and seed 0: u = the cloud's direction (the mean public gradient over
cloud.batches batches, as the cloud sends it), normalized; L_V = u^T H u with H the Hessian of the
loss on --examples of the clients' data (a Hessian-vector product); the rate that minimizes the
private loss along u in the quadratic model, 1 / L_V, and the stable bound 2 / L_V; the cosine
between u and the private gradient. Prints one JSON object per line.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.federated import client_data
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.run.task import load_task
from cooperllm_jax.tree_math import tree_dot
from cooperllm_jax.zoo.guided import DEFAULT_LR_V
from experiments.benchmark_settings import Plan

_SETTINGS = flags.DEFINE_list('settings', ['bbc_minilm_lora', 'rt_shifted_minilm_lora'],
                              'Benchmark settings (experiments/benchmark_settings.py).')
_TRAINABLE = flags.DEFINE_list('trainable', ['head', 'bitfit', 'lora', 'full'], 'Subsets.')
_EXAMPLES = flags.DEFINE_integer('examples', 128, "Clients' examples in the private loss.")


def measure(setting: str, trainable: str) -> dict:
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  from experiments.variants import apply_override  # pylint: disable=g-import-not-at-top
  plan = Plan.of(setting, methods=('cooperllm',))
  algorithm, overrides = plan.variant('cooperllm', 0.1, 0, {'fedmezo': 1e-3})  # rates unused
  config = demo.get_config(algorithm)
  for o in overrides + (f'zo.trainable={trainable}',):
    apply_override(config, o)
  cfg = config_lib.parse(config)
  task = load_task(cfg, needs_public=True)
  subset = cfg.zo.subset
  train, frozen = subset.split(task.pre.params, jax.random.key(cfg.seed))
  loss = make_loss(task.model)
  f = lambda t, batch: loss(subset.materialize(frozen, t), batch)
  pub = client_data.public_batches(task.public, cfg.cloud.batches, cfg.cloud.batch_size, cfg.seed, 1)
  grads = [jax.grad(f)(train, jax.tree.map(lambda x: x[k], pub)) for k in range(cfg.cloud.batches)]
  direction = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
  norm = jnp.sqrt(tree_dot(direction, direction))
  u = jax.tree.map(lambda g: g / norm, direction)
  idx = np.random.default_rng(0).choice(np.concatenate(task.partition.clients), _EXAMPLES.value,
                                        replace=False)
  batch = {'input_ids': jnp.asarray(task.arrays['input_ids'][idx]),
           'attention_mask': jnp.asarray(task.arrays['attention_mask'][idx]),
           'labels': jnp.asarray(task.labels[idx].astype(np.int32))}
  grad_private = jax.grad(f)(train, batch)
  _, hvp = jax.jvp(lambda t: jax.grad(f)(t, batch), (train,), (u,))
  curvature = float(tree_dot(u, hvp))
  slope = float(tree_dot(u, grad_private))
  return {'setting': setting, 'trainable': trainable,
          'd': int(sum(x.size for x in jax.tree.leaves(train))),
          'curvature_along_v': curvature, 'best_lr_v': 1 / curvature if curvature > 0 else None,
          'stable_lr_v_below': 2 / curvature if curvature > 0 else None,
          'default_lr_v': DEFAULT_LR_V,
          'cos_public_private': slope / float(jnp.sqrt(tree_dot(grad_private, grad_private))),
          'private_grad_along_v': slope}


def main(argv):
  del argv
  for setting in _SETTINGS.value:
    for trainable in _TRAINABLE.value:
      print(json.dumps(measure(setting, trainable)), flush=True)


if __name__ == '__main__':
  app.run(main)

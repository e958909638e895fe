r"""Client memory with the frozen base weights kept int8 / int4 (zo.base_weights) against float32.

  python -m experiments.bench.base_weights --models=minilm,smollm2 --subsets=head,lora

For each model and trainable subset: XLA's static memory estimate (cooperllm_jax.memory) of one
client's local training (`make_client_update`, --steps ZO steps of --batch x --seq tokens, trainable
weights donated), compiled from abstract shapes, so nothing is allocated or run. Only frozen weights
are quantized (symmetric, a float32 scale per --group columns, int4 packed two per byte), so
'full' (nothing frozen) is not measured. Prints one JSON object on stdout: peaks, the bytes of the
frozen weights as held, the ratios to float32, and the quantization error of the frozen weights,
|dequant(quant(w)) - w|^2 / |w|^2 over all of them (for SmolLM2, w is the GGUF file's Q4_1/Q8_0
weights as loaded: this is the cost of requantizing them).
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from cooperllm_jax import zoo
from cooperllm_jax.federated import clients as fzo
from cooperllm_jax.memory import compiled_memory
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.zoo import quantized
from experiments.bench import common

_MODELS = flags.DEFINE_list('models', ['minilm', 'smollm2'], 'Models to measure.')
_SUBSETS = flags.DEFINE_list('subsets', ['head', 'lora'], 'Trainable subsets (frozen rest).')
_FORMATS = flags.DEFINE_list('formats', ['f32', 'int8', 'int4'], 'Base weight formats.')
_GROUP = flags.DEFINE_integer('group', 32, 'Columns per quantization scale.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_STEPS = flags.DEFINE_integer('steps', 1, 'Local ZO steps per client update.')


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def held_bytes(tree) -> int:
  """Bytes of a tree of arrays (quantized leaves count values and scales)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def rel_error(held, frozen) -> float:
  sq = lambda t: sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in jax.tree.leaves(t))
  return sq(jax.tree.map(jnp.subtract, quantized.dequantize_tree(held), frozen)) / sq(frozen)


def bench_model(name):
  common.log(f'{name}: loading')
  pre = common.load(name)
  loss = make_loss(pre.model)
  lead = (_STEPS.value, _BATCH.value)
  batches = {'input_ids': jax.ShapeDtypeStruct((*lead, _SEQ.value), jnp.int32),
             'attention_mask': jax.ShapeDtypeStruct((*lead, _SEQ.value), jnp.int32),
             'labels': jax.ShapeDtypeStruct(lead, jnp.int32)}
  out = {}
  for mode in _SUBSETS.value:
    subset = zoo.Subset(mode)
    trainable, frozen = subset.split(pre.params, jax.random.key(0))
    update = fzo.make_client_update(loss, zoo.Estimator(), subset)
    r = {'trainable_bytes': held_bytes(trainable)}
    for fmt in _FORMATS.value:
      held = quantized.quantize_frozen(frozen, fmt, _GROUP.value)
      common.log(f'  {mode} {fmt}: compiling')
      memory = compiled_memory(update, abstract(trainable), abstract(held), batches, 0, 1, 0, 1e-5,
                               donate_argnums=0)
      r[fmt] = {'frozen_bytes': held_bytes(held), 'memory': memory}
      if fmt != 'f32':
        r[fmt].update(peak_over_f32=memory['peak_bytes'] / r['f32']['memory']['peak_bytes'],
                      frozen_over_f32=r[fmt]['frozen_bytes'] / r['f32']['frozen_bytes'],
                      frozen_rel_error=rel_error(held, frozen))
      common.log(f'  {mode} {fmt}: peak {r[fmt]["memory"]["peak_bytes"] / 2**20:.1f} MiB, frozen '
                 f'{r[fmt]["frozen_bytes"] / 2**20:.1f} MiB')
    out[mode] = r
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _FORMATS.value[:1] != ['f32']:
    raise app.UsageError('--formats must start with f32 (the baseline of the ratios)')
  report = {'benchmark': 'base_weights', 'env': common.environment(),
            'config': {'batch': _BATCH.value, 'seq': _SEQ.value, 'steps': _STEPS.value,
                       'group': _GROUP.value, 'probes': 1, 'scheme': 'central'},
            'models': {name: bench_model(name) for name in _MODELS.value}}
  common.emit(report)


if __name__ == '__main__':
  app.run(main)

r"""Per-device memory of one client's local training: BP + AdamW against ZO, with and without ZGR.

  python -m experiments.bench.device_memory --models=minilm,smollm2,llama1b --subsets=full

For each model (built from its config alone: no weights are loaded, only shapes matter) XLA's
static memory estimate (cooperllm_jax.memory.compiled_memory) of ONE client's local update of
--steps steps of --batch x --seq tokens, compiled from jax.ShapeDtypeStructs, so nothing is
allocated or run. Everything is float32 (weights, compute, guidance). Methods:

  bp_adamw          on-device fine-tuning by backprop + AdamW on every weight (the paper's
                    baseline, whatever --subsets says): --steps train steps (params, AdamW state,
                    batch) -> (params, AdamW state), both donated: weights, gradients, the two
                    moments and the activations saved for the backward pass
                    (bench/common.adamw_steps);
  bp_adamw_same_subset  the same on the subset ZO trains (LoRA + head, BitFit + head, head): the
                    same job, the fair comparison;
  zo_plain          the ZO client (federated/clients.py: make_client_update, one central SPSA
                    probe) with guide=None, i.e. FedMeZO; trainable weights donated, as
                    ScalarProtocol does;
  zo_full_guidance  the same client holding CooperLLM's whole guidance basis V, [m, *leaf] float32
                    for every trainable leaf (m = --pool), built as CooperLLM.init builds it;
  zo_layerwise      the paper's SPC client, which holds only the guidance of the stage it is
                    computing. NOT a compiled streaming client: it is zo_plain's compiled peak
                    (identical compute, no V argument) plus an accounted streaming buffer of TWO
                    guidance blocks (the one in use and the next one arriving), float32. A block
                    is one stage of system/workload.py (a transformer layer, the head) except the
                    embedding, whose guidance streams in row blocks no larger than the largest
                    other stage: a client only needs the rows it looks up, gathered block by block
                    (the key schedule draws z per row). Valid for FedSGD (--steps=1, the paper's
                    setting): with more local steps the client would need V again to update.

Prints one JSON object on stdout (per model: parameter count and, per trainable subset, the
trainable count, each method's memory dict, the stage blocks, and the reductions of the peaks
1 - zo_layerwise / bp_adamw and 1 - zo_full_guidance / bp_adamw, and against the same job
1 - zo_layerwise / bp_adamw_same_subset and 1 - zo_plain / bp_adamw_same_subset); progress and
compile times on stderr.
"""

import dataclasses
import json
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from cooperllm_jax import zoo
from cooperllm_jax.cloud import pool as pool_lib
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.federated import clients as fzo
from cooperllm_jax.memory import compiled_memory
from cooperllm_jax.models import abstract_params, count_params
from cooperllm_jax.models.common import make_loss
from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.system import workload as wl
from cooperllm_jax.zoo import guided
from experiments.bench import common

_MODELS = flags.DEFINE_list('models', ['minilm', 'smollm2', 'llama1b'], 'Models to measure.')
_SUBSETS = flags.DEFINE_list('subsets', ['full'], 'ZO trainable subsets: full, lora, bitfit, head.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Batch size (the paper\'s).')
_SEQ = flags.DEFINE_integer('seq', 128, 'Sequence length.')
_STEPS = flags.DEFINE_integer('steps', 1, 'Local steps per client update (1: FedSGD).')
_POOL = flags.DEFINE_integer('pool', 1, 'Guidance basis size m.')
_OUT = flags.DEFINE_string('out', None, 'Also write the JSON report here.')

LR = 1e-5
GUIDE_BYTES = 4  # V is float32


def stage_blocks(model, trainable, pool: int) -> dict:
  """Bytes of each stage's float32 guidance block (system/workload.py's stages), nonzero ones."""
  stages = wl.model_stages(model, trainable, 1)
  blocks = {s.name: wl.stage_guidance_bytes(s, codec_lib.LeafCodec('f32'), pool) for s in stages}
  return {name: b for name, b in blocks.items() if b}


def streaming_buffer(blocks: dict) -> int:
  """Two blocks of the largest stage, the embedding streamed in row blocks no larger than that."""
  others = [b for name, b in blocks.items() if name != 'embed']
  return 2 * (max(others) if others else blocks.get('embed', 0))


def _compile(label, fn, *args, **kwargs):
  start = time.perf_counter()
  memory = compiled_memory(fn, *args, **kwargs)
  seconds = time.perf_counter() - start
  common.log(f'  {label}: peak {memory["peak_bytes"] / 2**20:.1f} MiB ({seconds:.1f} s to compile)')
  return dict(memory, compile_s=round(seconds, 2))


def client_shapes(model, mode: str, pool: int):
  """Abstract (trainable, frozen, guide) of a ZO client training `mode`, guide as CooperLLM.init
  builds it (m = pool); eval_shape keeps LoRA's adapter init abstract too."""
  subset = zoo.Subset(mode)
  params = abstract_params(model.specs(), jnp.float32)
  trainable, frozen = jax.eval_shape(lambda p: subset.split(p, jax.random.key(0)), params)
  guide = jax.eval_shape(
      lambda t: guided.make_guidance(pool_lib.empty_pool(t, pool).directions, jnp.zeros(pool), 0.5),
      trainable)
  return trainable, frozen, guide


def measure(model, modes, batch: int, seq: int, steps: int = 1, pool: int = 1) -> dict:
  """The report of one model: BP + AdamW once, then the ZO methods for each trainable mode."""
  params = abstract_params(model.specs(), jnp.float32)
  lead = (steps, batch)
  batches = {'input_ids': jax.ShapeDtypeStruct((*lead, seq), jnp.int32),
             'attention_mask': jax.ShapeDtypeStruct((*lead, seq), jnp.int32),
             'labels': jax.ShapeDtypeStruct(lead, jnp.int32)}
  optimizer = optax.adamw(LR)

  def bp_adamw(mode, trainable, frozen):
    return _compile(f'{mode} bp_adamw', common.adamw_steps(model, optimizer, zoo.Subset(mode)),
                    trainable, jax.eval_shape(optimizer.init, trainable), frozen, batches,
                    donate_argnums=(0, 1))

  bp = bp_adamw('full', params, {})
  loss = make_loss(model)
  out = {'params': count_params(params), 'subsets': {}}
  for mode in modes:
    trainable, frozen, guide = client_shapes(model, mode, pool)
    bp_same = bp if mode == 'full' else bp_adamw(mode, trainable, frozen)
    update = fzo.make_client_update(loss, zoo.Estimator(), zoo.Subset(mode))
    args = (trainable, frozen, batches, 0, 1, 0, LR)
    plain = _compile(f'{mode} zo_plain', update, *args, donate_argnums=0)
    full = _compile(f'{mode} zo_full_guidance', update, *args, guide, donate_argnums=0)
    blocks = stage_blocks(model, trainable, pool)
    buffer = streaming_buffer(blocks)
    layerwise = {'peak_bytes': plain['peak_bytes'] + buffer,
                 'compiled_peak_bytes': plain['peak_bytes'], 'buffer_bytes': buffer}
    common.log(f'  {mode} zo_layerwise: peak {layerwise["peak_bytes"] / 2**20:.1f} MiB')
    out['subsets'][mode] = {
        'trainable_params': count_params(trainable),
        'guidance_bytes': count_params(guide.basis) * GUIDE_BYTES,
        'stage_block_bytes': blocks,
        'layerwise_buffer_bytes': buffer,
        'memory': {'bp_adamw': bp, 'bp_adamw_same_subset': bp_same, 'zo_plain': plain,
                   'zo_full_guidance': full, 'zo_layerwise': layerwise},
        # Against BP fine-tuning every weight (the paper's baseline) and against BP on the same
        # trainable subset (the same job).
        'reduction_layerwise_vs_bp': 1 - layerwise['peak_bytes'] / bp['peak_bytes'],
        'reduction_full_guidance_vs_bp': 1 - full['peak_bytes'] / bp['peak_bytes'],
        'reduction_layerwise_vs_bp_same_subset':
            1 - layerwise['peak_bytes'] / bp_same['peak_bytes'],
        'reduction_plain_vs_bp_same_subset': 1 - plain['peak_bytes'] / bp_same['peak_bytes']}
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = set(_MODELS.value) - set(common.MODEL_SHAPES)
  try:
    if unknown:
      raise ConfigError(f'unknown models {sorted(unknown)}; choose from '
                        f'{", ".join(common.MODEL_SHAPES)}')
    for mode in _SUBSETS.value:
      zoo.Subset(mode)
    if _BATCH.value < 1 or _SEQ.value < 1 or _STEPS.value < 1 or _POOL.value < 1:
      raise ConfigError('--batch, --seq, --steps and --pool must be >= 1')
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  models = {}
  for name in _MODELS.value:
    common.log(f'{name}: compiling')
    model = common.MODEL_SHAPES[name]()
    models[name] = dict(config=dataclasses.asdict(model.cfg),
                        **measure(model, _SUBSETS.value, _BATCH.value, _SEQ.value, _STEPS.value,
                                  _POOL.value))
  report = {'benchmark': 'device_memory', 'env': common.environment(),
            'config': {'batch': _BATCH.value, 'seq': _SEQ.value, 'steps': _STEPS.value,
                       'pool': _POOL.value, 'dtype': 'float32', 'probes': 1, 'scheme': 'central',
                       'optimizer': 'adamw', 'layerwise_buffer_blocks': 2},
            'models': models}
  common.emit(report)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(json.dumps(report, indent=1) + '\n')


if __name__ == '__main__':
  app.run(main)

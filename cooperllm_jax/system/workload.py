"""What a round costs in FLOPs and bytes, stage by stage, from the real model's shapes.

A model is a chain of stages in forward order: 'embed', 'layer_0' .. 'layer_{L-1}', 'head'. SPC
pipelines over these stages: the guidance of a stage is its own message, and a client can run
stage l as soon as stage l's guidance and stage l-1's activations are there.

Forward FLOPs are counted analytically from the model config (2 per multiply-add of every matmul,
attention's two T x T products included; norms, softmax and activations are not counted): tests
check the count against XLA's cost analysis of the compiled forward. A client perturbs every
trainable weight in each forward pass: regenerating z costs DIRECTION_FLOPS per weight (threefry2x32
is 20 rounds of add/rotate/xor per two 32-bit words, plus the normal transform), and the guided part
V u 2m more.
"""

import dataclasses
import math
from typing import Sequence

import jax

from cooperllm_jax.models.decoder import Decoder
from cooperllm_jax.models.encoder import Encoder
from cooperllm_jax.models.spec import path_str
from cooperllm_jax.system import codec as codec_lib

DIRECTION_FLOPS = 30   # per regenerated direction element (threefry + normal transform)
ENCODE_FLOPS = 8       # per guidance value coded on the cloud (scale, round, pack)
DECODE_FLOPS = 2       # per guidance value decoded on the client
BACKWARD_FACTOR = 2    # a backward pass costs about twice the forward's FLOPs
ADAMW_FLOPS = 12       # per weight and step


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  example_flops: float          # forward FLOPs per example at the workload's sequence length
  trainable: int = 0            # trainable weights in this stage (its share of d)
  forward_flops: float = 0.0    # per forward pass, whatever the batch (LoRA's W + A @ B merge)
  leaves: tuple = ()            # (path, shape of this stage's slice) of its trainable leaves
  shared: bool = False          # unperturbed and before every perturbed stage: the probes of a
                                # step share its activations, so it runs once per step


def _layer_flops(model, seq: int) -> float:
  """Forward FLOPs of one transformer layer for one example of `seq` tokens."""
  c = model.cfg
  h, f = c.hidden_size, c.intermediate_size
  if isinstance(model, Encoder):
    q = h
    matmul = 4 * h * h + 2 * h * f                       # q, k, v, o; up, down
  elif isinstance(model, Decoder):
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    matmul = h * q + 2 * h * kv + q * h + 3 * h * f      # q, k, v, o; gate, up, down
  else:
    raise TypeError(f'no FLOP count for model type {type(model).__name__}')
  return seq * (2 * matmul + 4 * seq * q)                # + scores and attention-weighted values


def _head_flops(model) -> float:
  """Forward FLOPs of the classification head for one example (after pooling / the last token)."""
  c = model.cfg
  if isinstance(model, Encoder):
    return 2 * c.hidden_size * c.num_labels + (2 * c.hidden_size ** 2 if c.pooling == 'pooler'
                                               else 0)
  return 2 * c.hidden_size * max(len(c.label_token_ids), 1)   # label-word logits only


def stage_names(num_layers: int) -> list[str]:
  return ['embed'] + [f'layer_{i}' for i in range(num_layers)] + ['head']


def model_stages(model, trainable, seq: int) -> tuple[Stage, ...]:
  """The model's stages with their FLOPs and the trainable weights (a tree of arrays or
  ShapeDtypeStructs, as zoo.Subset splits them) each one holds."""
  num_layers = model.cfg.num_layers
  names = stage_names(num_layers)
  flops = {name: 0.0 for name in names}
  flops.update({f'layer_{i}': float(_layer_flops(model, seq)) for i in range(num_layers)})
  flops['head'] = float(_head_flops(model))
  counts = {name: 0 for name in names}
  merge = {name: 0.0 for name in names}
  leaves = {name: [] for name in names}
  shapes = {path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  for name, shape in shapes.items():
    group = name.split('/', 1)[0]
    if group == 'layers':
      per_layer = shape[1:]
      for i in range(num_layers):
        counts[f'layer_{i}'] += math.prod(per_layer)
        leaves[f'layer_{i}'].append((name, per_layer))
      if name.endswith('lora_b'):   # merged as W + s A @ B inside each forward
        rank, out = per_layer
        a_in = shapes[name[:-len('lora_b')] + 'lora_a'][1]
        for i in range(num_layers):
          merge[f'layer_{i}'] += 2.0 * a_in * rank * out
    else:
      stage = 'embed' if group == 'embed' else 'head'
      counts[stage] += math.prod(shape)
      leaves[stage].append((name, shape))
  first = next((i for i, n in enumerate(names) if counts[n]), len(names))
  return tuple(Stage(n, flops[n], counts[n], merge[n], tuple(leaves[n]), shared=i < first)
               for i, n in enumerate(names))


def stage_guidance_bytes(stage: Stage, codecs, pool_size: int) -> int:
  """Wire bytes of this stage's slice of the guidance basis [m, ...], coded as its own message."""
  return sum(codec_lib.codec_of(codecs, tuple(name.split('/'))).nbytes((pool_size,) + shape)
             for name, shape in stage.leaves)


def forward_flops(stage: Stage, batch: int, pool_size: int = 0) -> float:
  """One perturbed forward pass of `stage` over `batch` examples: the matmuls, the merge, and
  regenerating this stage's directions (plus V u when guided, pool_size = m > 0)."""
  perturb = stage.trainable * (DIRECTION_FLOPS + 2 + 2 * pool_size) if stage.trainable else 0
  return batch * stage.example_flops + stage.forward_flops + perturb


def step_flops(stages: Sequence[Stage], batch: int, passes: float, pool_size: int = 0) -> list:
  """Per stage, the FLOPs of one local step: `passes` perturbed forward passes, a shared stage
  once (the probes share its activations)."""
  return [(1 if s.shared else passes) * forward_flops(s, batch, pool_size) for s in stages]


def total(stages: Sequence[Stage], field: str) -> float:
  return sum(getattr(s, field) for s in stages)

"""experiments/bench/device_memory: its accounting checked against hand counts on tiny configs."""

import jax
import jax.numpy as jnp
import pytest

from cooperllm_jax.models import (Decoder, DecoderConfig, Encoder, EncoderConfig, abstract_params,
                                  count_params)
from experiments.bench import common
from experiments.bench import device_memory

F32 = 4
POOL = 2
BATCH, SEQ = 2, 16
ENC = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                    max_positions=64, num_labels=3)
# A vocabulary large enough that the embedding, not a layer, is the largest stage.
DEC = DecoderConfig(vocab_size=997, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=64, label_token_ids=(1, 2, 3))


def encoder_counts(c):
  """(embed, one layer, head) weights of a BERT encoder: kernels and biases, norms scale and bias."""
  h, f = c.hidden_size, c.intermediate_size
  embed = (c.vocab_size + c.max_positions + c.type_vocab_size) * h + 2 * h
  layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
  return embed, layer, h * c.num_labels + c.num_labels


def decoder_counts(c):
  """(embed, one layer, final norm) weights of a tied LLaMA decoder (no biases)."""
  h, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * f
  return c.vocab_size * h, layer, h


def test_full_subset_accounting():
  """On the decoder only: the encoder's compiles take as long again and check nothing more."""
  embed, layer, head = decoder_counts(DEC)
  total = embed + DEC.num_layers * layer + head
  report = device_memory.measure(Decoder(DEC), ['full'], BATCH, SEQ, pool=POOL)
  r = report['subsets']['full']
  mem = r['memory']
  bp, plain, full = mem['bp_adamw'], mem['zo_plain'], mem['zo_full_guidance']
  assert report['params'] == r['trainable_params'] == total
  weights, batch = total * F32, BATCH * SEQ * 2 * F32 + BATCH * F32
  # BP + AdamW: params, the two moments (+ the step count) and a batch in, updated in place, at
  # least the gradients in between.
  state = 3 * weights + F32
  assert bp['argument_bytes'] == state + batch
  assert bp['alias_bytes'] == state
  outputs = 3 * len(jax.tree.leaves(Decoder(DEC).specs())) + 2    # + the count and the losses
  assert 0 <= bp['output_bytes'] - (state + F32) <= 8 * outputs   # + a tuple of pointers on CPU
  assert bp['temp_bytes'] >= weights
  # ZO updates the donated weights in place.
  assert plain['alias_bytes'] == weights
  # V [m, *leaf], valid [m], alpha, beta, probe_v, step_v and step_plain are arguments on top of
  # plain ZO's.
  v_bytes = POOL * weights
  assert r['guidance_bytes'] == v_bytes
  assert full['argument_bytes'] - plain['argument_bytes'] == v_bytes + POOL * F32 + 5 * F32
  assert full['peak_bytes'] >= plain['peak_bytes'] + v_bytes
  assert embed > layer > head   # the embedding streams in row blocks of a layer's size
  assert r['layerwise_buffer_bytes'] == 2 * POOL * F32 * layer
  assert mem['zo_layerwise']['peak_bytes'] == plain['peak_bytes'] + r['layerwise_buffer_bytes']
  assert r['reduction_layerwise_vs_bp'] == pytest.approx(
      1 - mem['zo_layerwise']['peak_bytes'] / bp['peak_bytes'])
  assert r['reduction_full_guidance_vs_bp'] == pytest.approx(
      1 - full['peak_bytes'] / bp['peak_bytes'])


def test_stage_blocks_by_hand():
  embed, layer, head = encoder_counts(ENC)
  trainable, _, _ = device_memory.client_shapes(Encoder(ENC), 'full', POOL)
  blocks = device_memory.stage_blocks(Encoder(ENC), trainable, POOL)
  assert blocks == {'embed': POOL * F32 * embed, 'layer_0': POOL * F32 * layer,
                    'layer_1': POOL * F32 * layer, 'head': POOL * F32 * head}
  assert device_memory.streaming_buffer(blocks) == 2 * POOL * F32 * layer   # layer > embed here
  embed, layer, norm = decoder_counts(DEC)
  trainable, _, _ = device_memory.client_shapes(Decoder(DEC), 'full', POOL)
  blocks = device_memory.stage_blocks(Decoder(DEC), trainable, POOL)
  assert blocks == {'embed': POOL * F32 * embed, 'layer_0': POOL * F32 * layer,
                    'layer_1': POOL * F32 * layer, 'head': POOL * F32 * norm}
  assert embed > layer   # the embedding streams in row blocks of a layer's size
  assert device_memory.streaming_buffer(blocks) == 2 * POOL * F32 * layer
  assert device_memory.streaming_buffer({'embed': 10}) == 20   # nothing else: the whole table


def test_lora_adapters_are_in_the_layer_stage():
  """LoRA on q and v (rank 8): A [h, r] and B [r, h] per target and layer, plus the head."""
  rank, h = 8, ENC.hidden_size
  adapters, (_, _, head) = 2 * (h * rank + rank * h), encoder_counts(ENC)
  trainable, frozen, guide = device_memory.client_shapes(Encoder(ENC), 'lora', POOL)
  assert count_params(trainable) == ENC.num_layers * adapters + head
  assert count_params(guide.basis) == POOL * count_params(trainable)
  assert count_params(trainable) + count_params(frozen) == (
      count_params(abstract_params(Encoder(ENC).specs(), jnp.float32)) + ENC.num_layers * adapters)
  assert device_memory.stage_blocks(Encoder(ENC), trainable, POOL) == {
      'layer_0': POOL * F32 * adapters, 'layer_1': POOL * F32 * adapters, 'head': POOL * F32 * head}


def test_bench_configs_have_the_published_sizes():
  """Parameter counts of the real checkpoints (MiniLM: BertModel's 22,713,216 less its unused
  pooler, plus the 5-class classifier), so the configs are the models the report names."""
  sizes = {name: count_params(abstract_params(make().specs(), jnp.float32))
           for name, make in common.MODEL_SHAPES.items()}
  h = 384
  assert sizes == {'minilm': 22_713_216 - (h * h + h) + (h * 5 + 5),
                   'smollm2': 134_515_008, 'llama1b': 1_235_814_400}


def test_bp_on_the_same_subset_holds_that_subsets_state_only():
  """BP + AdamW on the head alone (the same job as head-only ZO): AdamW's state is three copies of
  the head (+ the step count), and the frozen body is an argument it never updates."""
  embed, layer, head = encoder_counts(ENC)
  report = device_memory.measure(Encoder(ENC), ['head'], BATCH, SEQ, pool=POOL)
  r = report['subsets']['head']
  same, plain = r['memory']['bp_adamw_same_subset'], r['memory']['zo_plain']
  body = (embed + ENC.num_layers * layer) * F32
  state = 3 * head * F32 + F32
  batch = BATCH * SEQ * 2 * F32 + BATCH * F32
  assert same['argument_bytes'] == state + body + batch
  assert same['alias_bytes'] == state
  assert same['peak_bytes'] < r['memory']['bp_adamw']['peak_bytes']
  assert r['reduction_plain_vs_bp_same_subset'] == pytest.approx(
      1 - plain['peak_bytes'] / same['peak_bytes'])
  assert r['reduction_layerwise_vs_bp_same_subset'] == pytest.approx(
      1 - r['memory']['zo_layerwise']['peak_bytes'] / same['peak_bytes'])

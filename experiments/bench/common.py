"""What the benchmarks share: the models, synthetic batches, timing and the JSON report."""

import json
import os
import statistics
import sys
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

# pylint: disable-next=g-import-not-at-top
from cooperllm_jax.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from cooperllm_jax.models.common import make_loss  # pylint: disable=g-import-not-at-top
from cooperllm_jax.zoo.spsa import loss_at  # pylint: disable=g-import-not-at-top

NUM_LABELS = 5
LABEL_WORDS = ('business', 'entertainment', 'politics', 'sport', 'tech')  # BBC News topics
LABEL_TOKENS = tuple(range(1, NUM_LABELS + 1))  # any ids: only their count shapes the head

# Real models' shapes, for measuring without loading weights (abstract params).
MODEL_SHAPES = {
    # all-MiniLM-L6-v2: the encoder defaults.
    'minilm': lambda: Encoder(EncoderConfig(num_labels=NUM_LABELS)),
    # SmolLM2-135M: the decoder defaults.
    'smollm2': lambda: Decoder(DecoderConfig(label_token_ids=LABEL_TOKENS)),
    # Llama-3.2-1B's shape.
    'llama1b': lambda: Decoder(DecoderConfig(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True,
        label_token_ids=LABEL_TOKENS)),
}


def adamw_steps(model, optimizer, subset):
  """The backprop baseline on a device: train(trainable, opt_state, frozen, batches [S, ...]) ->
  (trainable, opt_state, losses [S]), S optimizer steps on the subset's trainable leaves (its
  split; 'full' trains every weight, frozen = {}), the optimizer state kept as a local fine-tuner
  keeps it. Holds weights, gradients, both AdamW moments and the saved activations."""
  loss_fn = make_loss(model)

  def train(trainable, opt_state, frozen, batches):
    def step(carry, batch):
      t, state = carry
      value, grads = jax.value_and_grad(
          lambda t: loss_at(loss_fn, t, frozen, batch, None, 0.0, subset=subset))(t)
      updates, state = optimizer.update(grads, state, t)
      return (optax.apply_updates(t, updates), state), value

    (trainable, opt_state), losses = jax.lax.scan(step, (trainable, opt_state), batches)
    return trainable, opt_state, losses

  return train


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def load(name: str):
  """The pretrained model as the experiments use it (5 BBC classes; decoders score label words)."""
  from cooperllm_jax.models import load_pretrained  # pylint: disable=g-import-not-at-top
  if name == 'smollm2':
    return load_pretrained(name, num_labels=NUM_LABELS, label_words=list(LABEL_WORDS))
  return load_pretrained(name, num_labels=NUM_LABELS)


def synthetic_batch(vocab_size: int, lead: tuple, seq: int, seed: int = 0) -> dict:
  """Random ids < vocab, a full attention mask and random labels; `lead` is the leading shape
  ([B], or [C, S, B] for a round's clients and steps)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab_size, (*lead, seq), dtype=np.int32)
  return {'input_ids': jax.numpy.asarray(ids),
          'attention_mask': jax.numpy.ones((*lead, seq), jax.numpy.int32),
          'labels': jax.numpy.asarray(rng.integers(0, NUM_LABELS, lead, dtype=np.int32))}


def timed(calls: dict, repeats: int) -> dict:
  """Seconds per call of each `state = fn(state)` in calls {name: (fn, state)}, blocked until
  ready: one warm-up call each, then `repeats` rounds that call each once in turn, so that load from
  other processes hits all of them alike. Each call gets the previous output, so fn may donate it."""
  return timed_wall_cpu(calls, repeats)[0]


def timed_wall_cpu(calls: dict, repeats: int) -> tuple[dict, dict]:
  """timed's wall seconds and, call by call, this process's CPU seconds (all its threads): the
  work done, which other processes on the cores change less than the wall time."""
  states = {k: jax.block_until_ready(fn(s)) for k, (fn, s) in calls.items()}
  wall, cpu = {k: [] for k in calls}, {k: [] for k in calls}
  for _ in range(repeats):
    for k, (fn, _) in calls.items():
      start, cpu_start = time.perf_counter(), time.process_time()
      states[k] = jax.block_until_ready(fn(states[k]))
      wall[k].append(time.perf_counter() - start)
      cpu[k].append(time.process_time() - cpu_start)
  return wall, cpu


def summary(times) -> dict:
  return {'median_s': statistics.median(times), 'min_s': min(times), 'repeats': len(times)}


def environment() -> dict:
  """What the numbers depend on; loadavg shows other processes competing for the CPU."""
  return {'jax': jax.__version__, 'backend': jax.default_backend(),
          'device': jax.devices()[0].device_kind, 'cpus': os.cpu_count(),
          'loadavg': [round(x, 2) for x in os.getloadavg()]}


def emit(report: dict):
  """The benchmark's one JSON object, on stdout."""
  print(json.dumps(report, indent=1, sort_keys=False))

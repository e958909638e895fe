"""compiled_memory: XLA's static estimate, from abstract shapes."""

import jax
import jax.numpy as jnp
import pytest

from cooperllm_jax.memory import compiled_memory

MIB = 2**20
X = jax.ShapeDtypeStruct((512, 512), jnp.float32)   # 1 MiB, never allocated


def test_sizes_of_arguments_and_outputs():
  m = compiled_memory(lambda x: jnp.concatenate([x, x]).astype(jnp.int8), X)
  assert m['argument_bytes'] == MIB
  assert m['output_bytes'] == 2 * 512 * 512      # int8 [1024, 512]
  assert m['alias_bytes'] == 0
  assert m['peak_bytes'] == m['argument_bytes'] + m['output_bytes'] + m['temp_bytes']


def test_donation_reuses_the_argument():
  double = lambda x: x * 2
  kept = compiled_memory(double, X)
  donated = compiled_memory(double, X, donate_argnums=0)
  assert kept['peak_bytes'] == 2 * MIB
  assert donated['alias_bytes'] == MIB
  assert donated['peak_bytes'] == MIB


def test_python_scalars_and_real_arrays():
  m = compiled_memory(lambda x, s: x * s, jnp.ones((256,), jnp.float32), 3.0)
  assert m['argument_bytes'] >= 1024 and m['output_bytes'] == 1024


def test_missing_analysis_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(jax.stages.Compiled, 'memory_analysis', lambda self: None)
  with pytest.raises(RuntimeError, match='no memory analysis'):
    compiled_memory(lambda x: x + 1, X)


def test_zo_update_draws_z_in_blocks_not_whole_leaves():
  """On CPU a whole-leaf threefry draw keeps ~4 leaf-sized uint32 buffers; the update must not."""
  from cooperllm_jax import zoo  # pylint: disable=g-import-not-at-top
  table = jax.ShapeDtypeStruct((4096, 256), jnp.float32)              # 4 MiB
  keys = jax.ShapeDtypeStruct((2,), jax.random.key(0).dtype)
  m = compiled_memory(lambda t, k: zoo.apply_directions(t, k, jnp.ones(2)),
                      {'embed': {'token': table}}, keys, donate_argnums=0)
  assert m['temp_bytes'] < 4 * MIB / 2


def test_zo_step_needs_about_one_forward_of_memory():
  """The issue's target, from abstract MiniLM-sized shapes: ZO step peak <= 1.15x forward peak."""
  from cooperllm_jax import zoo  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.models import Encoder, EncoderConfig, abstract_params  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.models.common import make_loss  # pylint: disable=g-import-not-at-top
  model = Encoder(EncoderConfig(family='bert', vocab_size=30522, hidden_size=384, num_layers=6,
                                num_heads=12, intermediate_size=1536, max_positions=512,
                                num_labels=5))
  params = abstract_params(model.specs(), jnp.float32)
  b, t = 16, 128
  batch = {'input_ids': jax.ShapeDtypeStruct((b, t), jnp.int32),
           'attention_mask': jax.ShapeDtypeStruct((b, t), jnp.int32),
           'labels': jax.ShapeDtypeStruct((b,), jnp.int32)}
  loss = make_loss(model)
  forward = compiled_memory(lambda p, x: loss(p, x), params, batch)
  step = zoo.make_zo_step(loss, zoo.Estimator(), zoo.Subset('full'))
  keys = jax.ShapeDtypeStruct((1,), jax.random.key(0).dtype)
  zo_step = compiled_memory(step, params, {}, batch, keys, 1e-5, donate_argnums=0)
  assert zo_step['peak_bytes'] <= 1.15 * forward['peak_bytes'], (zo_step, forward)

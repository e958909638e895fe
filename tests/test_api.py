"""The public API as the README shows it: a user's own loop over jitted pure round functions."""

import dataclasses
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import cooperllm_jax as cj
from cooperllm_jax.models import Encoder, EncoderConfig


def test_readme_loop_with_public_api_replays_to_the_same_model():
  model = Encoder(EncoderConfig(family='bert', vocab_size=64, hidden_size=16, num_layers=2,
                                num_heads=2, intermediate_size=32, max_positions=16, num_labels=3))
  params = model.init(jax.random.key(0))
  loss = cj.make_loss(model)
  est, subset = cj.Estimator(eps=1e-3, probes=2), cj.Subset('lora', lora_rank=2)
  trainable, frozen = subset.split(params, jax.random.key(0))
  client_update = cj.make_client_update(loss, est, subset)
  round_fn = cj.make_round(client_update, seed=0, chunk=2)
  rng = np.random.default_rng(0)
  c, s, b, t = 3, 2, 4, 8
  batches = {'input_ids': jnp.asarray(rng.integers(0, 64, (c, s, b, t)), jnp.int32),
             'attention_mask': jnp.ones((c, s, b, t), jnp.int32),
             'labels': jnp.asarray(rng.integers(0, 3, (c, s, b)), jnp.int32)}
  counts, clients = jnp.array([5., 10., 20.]), jnp.array([3, 7, 9], jnp.int32)
  start = jax.tree.map(jnp.copy, trainable)
  out = round_fn(trainable, frozen, batches, counts, clients, 1, 1e-2)
  trainable, uplinks, losses = out.trainable, out.uplinks, out.losses
  assert uplinks.scalars.shape == (c, s, 2) and losses.shape == (c, s)
  assert np.all(np.asarray(uplinks.addresses[..., 1]) == np.asarray(clients)[:, None, None])
  # The edge's model is the replay of the uplink: anyone holding the ledger rebuilds it.
  coefs = cj.coefficients(1e-2, uplinks.scalars, uplinks.weights) * (counts / counts.sum())[:, None, None]
  rebuilt = jax.jit(cj.replay)(start, 0, uplinks.addresses.reshape(-1, 4), coefs.reshape(-1))
  for a, r, s0 in zip(jax.tree.leaves(trainable), jax.tree.leaves(rebuilt), jax.tree.leaves(start)):
    np.testing.assert_allclose(a, r, rtol=0, atol=1e-6)
  assert any(not np.array_equal(a, s0) for a, s0 in zip(jax.tree.leaves(trainable),
                                                         jax.tree.leaves(start)))
  merged = subset.materialize(frozen, trainable)
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def _unannotated(fn, name: str) -> list:
  sig = inspect.signature(fn)
  gaps = [f'{name}({p.name})' for p in sig.parameters.values()
          if p.name not in ('self', 'cls') and p.annotation is inspect.Parameter.empty]
  if sig.return_annotation is inspect.Signature.empty and not name.endswith('__init__'):
    gaps.append(f'{name} -> ?')
  return gaps


def test_public_api_is_documented_and_fully_annotated():
  """Every name cooperllm_jax exports has a docstring; its functions, constructors and public
  methods annotate every parameter and their return (the package ships py.typed)."""
  gaps, undocumented = [], []
  for name in cj.__all__:
    obj = getattr(cj, name)
    if not callable(obj):
      continue
    if not inspect.getdoc(obj):
      undocumented.append(name)
    if not inspect.isclass(obj):
      gaps += _unannotated(obj, name)
      continue
    protocol = getattr(obj, '_is_protocol', False)   # typing.Protocol's own __init__
    if ('__init__' in vars(obj) or dataclasses.is_dataclass(obj)) and not protocol:
      gaps += _unannotated(obj.__init__, f'{name}.__init__')
    for attr, fn in vars(obj).items():
      if (not attr.startswith('_') or attr == '__call__') and inspect.isfunction(fn):
        gaps += _unannotated(fn, f'{name}.{attr}')
  assert not undocumented, undocumented
  assert not gaps, gaps
  assert (pathlib.Path(cj.__file__).parent / 'py.typed').exists()

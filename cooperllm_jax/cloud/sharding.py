"""Sharding of the cloud's weights: logical-axis rules onto the run's mesh (cooperllm_jax/mesh.py).

One mesh serves both tiers: simulated clients are split over 'clients' (cooperllm_jax/mesh.py; only
their scalars cross it), the cloud's weights and public batches over 'data' and 'model' (its
NamedShardings never name 'clients', so they are replicated along it).

The models name every weight dimension with a logical axis (`ParamSpec.axes`); `LOGICAL_RULES` maps
those names onto mesh axes, as Flax's `logical_to_mesh_sharding` does. The layout is FSDP over
'data' (the hidden 'embed' dimension of every weight is split across the data-parallel devices, so
each holds 1/data of the model and the optimizer state, all-gathered per use) plus tensor
parallelism over 'model' (heads, MLP and vocabulary dimensions). The mesh uses Auto axis types:
the models are not written with sharding-in-types, so the compiler's propagation (GSPMD/Shardy)
places the activations from the weights' and the batch's shardings.
"""

from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.models.spec import logical_axes

LOGICAL_RULES = (
    ('layers', None),         # scanned over; every device needs each layer in turn
    ('embed', 'data'),        # FSDP: the hidden dimension of every weight
    ('vocab', 'model'),
    ('heads', 'model'),
    ('kv_heads', 'model'),
    ('mlp', 'model'),
    ('embed_out', 'model'),   # the BERT pooler's output
    ('positions', None),      # small tables: their 'embed' dimension is already split
    ('token_types', None),
    ('classes', None),        # a handful of labels
)


def logical_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                 rules=LOGICAL_RULES) -> PartitionSpec:
  """The PartitionSpec of one array: each dim gets its rule's mesh axis if the dim divides evenly
  and the leaf has not used that mesh axis yet (uneven shards would pad); else it is replicated.
  A None logical axis is replicated."""
  table = dict(rules)
  used, out = set(), []
  for name, size in zip(axes, shape):
    if name is not None and name not in table:
      raise ConfigError(f'no sharding rule for logical axis {name!r}')
    target = None if name is None else table[name]
    if target is not None and target not in used and size % mesh.shape[target] == 0:
      used.add(target)
      out.append(target)
    else:
      out.append(None)
  return PartitionSpec(*out)


def _lookup(tree, path):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree if isinstance(tree, tuple) else None


def _shardings(axes_at, shapes_tree, mesh: Mesh, rules):
  def one(path, x):
    axes = axes_at(tuple(getattr(k, 'key', k) for k in path))
    if axes is None or len(axes) != len(x.shape):
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_spec(axes, x.shape, mesh, rules))

  return jax.tree_util.tree_map_with_path(one, shapes_tree)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings mirroring `shapes_tree` (arrays or ShapeDtypeStructs; a subset of the params is
  fine), each leaf's logical axes looked up at its path in `axes_tree` (nested dicts of axis-name
  tuples, as `logical_axes` gives). Leaves without axes there are replicated."""
  return _shardings(lambda keys: _lookup(axes_tree, keys), shapes_tree, mesh, rules)


def lora_axes(kernel_axes: tuple, name: str) -> tuple:
  """A LoRA factor's axes from its kernel's ('layers', in, out): lora_a [layers, in, r] keeps the
  input axis, lora_b [layers, r, out] the output axis; the rank r is replicated."""
  layers, d_in, d_out = kernel_axes
  return (layers, d_in, None) if name == 'lora_a' else (layers, None, d_out)


def trainable_shardings(model, trainable, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a trainable subset tree (`Subset.split`'s first output): leaves at the
  model's param paths use their (stacked) specs' axes, LoRA factors their kernel's (`lora_axes`),
  anything else is replicated."""
  model_axes = logical_axes(model.specs())

  def axes_at(keys):
    if keys[-1] in ('lora_a', 'lora_b'):
      kernel = _lookup(model_axes, keys[:-1] + ('kernel',))
      return None if kernel is None else lora_axes(kernel, keys[-1])
    return _lookup(model_axes, keys)

  return _shardings(axes_at, trainable, mesh, rules)


def spec_shardings(model, tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for any subset of the model's plain params (e.g. the frozen part)."""
  return tree_shardings(logical_axes(model.specs()), tree, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Data parallelism: the batch dimension split over 'data', everything else replicated."""
  spec = [None] * ndim
  spec[batch_axis] = 'data'
  return NamedSharding(mesh, PartitionSpec(*spec))

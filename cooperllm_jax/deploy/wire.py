"""Pytrees on Flower's wire, bit for bit.

Flower's own numpy arrays keep neither bfloat16 nor int4, so every leaf travels as its raw bytes
with its dtype's name ('raw' stype); the receiver rebuilds the tree from a template of the same
structure that it builds itself (its own trainable weights), so no code or pickle travels.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord

RAW = 'raw'


def encode(tree: Any) -> ArrayRecord:
  """The tree's leaves, in jax.tree order, as raw-byte Arrays."""
  arrays = {}
  for i, leaf in enumerate(jax.tree.leaves(tree)):
    x = np.asarray(leaf)
    arrays[f'{i:06d}'] = Array(dtype=x.dtype.name, shape=tuple(x.shape), stype=RAW,
                               data=x.tobytes())
  return ArrayRecord(arrays)


def decode(record: ArrayRecord, like: Any) -> Any:
  """The tree `encode` sent, in the structure of `like` (its leaves' values are not read)."""
  treedef = jax.tree.structure(like)
  keys = sorted(record.keys())
  if len(keys) != treedef.num_leaves:
    raise ValueError(f'a record of {len(keys)} arrays for a tree of {treedef.num_leaves} leaves')
  leaves = [np.frombuffer(record[k].data, jnp.dtype(record[k].dtype)).reshape(record[k].shape)
            for k in keys]
  return jax.tree.unflatten(treedef, leaves)


def payload_bytes(record: ArrayRecord) -> int:
  """The bytes of the arrays a record carries (Flower's framing comes on top)."""
  return sum(len(record[k].data) for k in record.keys())

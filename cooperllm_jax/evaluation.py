"""Held-out evaluation: accuracy and mean loss over a tokenized split, in fixed-size jitted batches."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax.models.common import classification_loss
from cooperllm_jax.models.pretrained import Model


@functools.partial(jax.jit, static_argnums=0)
def eval_batch(model, params, batch):
  """(correct predictions, summed cross-entropy) of one padded batch {input_ids, attention_mask,
  labels, weight}: the jitted step `evaluate` runs (public, so it can be exported or AOT-compiled
  for an accelerator; rows with weight 0 count for nothing)."""
  logits = model.logits(params, batch)
  correct = (logits.argmax(-1) == batch['labels']) * batch['weight']
  loss = classification_loss(logits, batch['labels'], batch['weight']) * batch['weight'].sum()
  return correct.sum(), loss


def evaluate(model: Model, params: Any, arrays: dict, labels: np.ndarray, indices: np.ndarray,
             batch_size: int = 64) -> dict:
  """{'accuracy', 'loss', 'examples'} of `model` at `params` on the examples `indices`; one
  jitted batch shape (the last batch is padded with weight 0), so any split compiles once.

  Args:
    model: the Encoder or Decoder (Pretrained.model).
    params: the full params tree (frozen and trainable overlaid).
    arrays: the tokenized dataset {input_ids, attention_mask: [N, L]} (data.tokenize_texts).
    labels: the dataset's integer labels [N].
    indices: the examples to evaluate (non-empty).
    batch_size: the examples per jitted batch.

  Returns:
    {'accuracy': float, the share predicted right; 'loss': float, the mean cross-entropy;
    'examples': int, len(indices)}.
  """
  correct = total_loss = 0.0
  for start in range(0, len(indices), batch_size):
    idx = indices[start:start + batch_size]
    pad = batch_size - len(idx)
    take = np.concatenate([idx, np.full(pad, idx[0])])
    batch = {'input_ids': arrays['input_ids'][take], 'attention_mask': arrays['attention_mask'][take],
             'labels': labels[take].astype(np.int32),
             'weight': np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(np.float32)}
    c, l = eval_batch(model, params, jax.tree.map(jnp.asarray, batch))
    correct += float(c)
    total_loss += float(l)
  n = len(indices)
  return {'accuracy': correct / n, 'loss': total_loss / n, 'examples': n}


def majority_rate(labels: np.ndarray, indices: np.ndarray) -> float:
  """The accuracy of always predicting the most frequent class of labels[indices]: the chance
  level a classifier must beat on a skewed split (1/num_classes only when classes are balanced).

  Args:
    labels: the dataset's non-negative integer labels [N].
    indices: the split's examples (non-empty).

  Returns:
    The majority class's share of labels[indices], a float.
  """
  return float(np.bincount(labels[indices]).max() / len(indices))

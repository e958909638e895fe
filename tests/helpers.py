"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

import numpy as np


def padded_batch(tokenizer, texts, pad_id):
  """Right-padded int32 {'input_ids', 'attention_mask'} for texts, as the models expect."""
  encs = [tokenizer.encode(t).ids for t in texts]
  ids = np.full((len(encs), max(map(len, encs))), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(encs):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1
  return {'input_ids': ids, 'attention_mask': mask}

"""The dataset type every loader returns (sources.py: BBC News and local files; corpora.py)."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy fields make `==` ambiguous.
class TextDataset:
  """Texts with integer labels indexing `label_names`.

  Attributes:
    name: the dataset's name (a named dataset's or the local file's).
    texts: the N example texts.
    labels: int32 [N], each an index into `label_names`.
    label_names: the class names; `num_classes` is their count.
  """
  name: str
  texts: tuple[str, ...]
  labels: np.ndarray  # int32 [N]
  label_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.texts)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

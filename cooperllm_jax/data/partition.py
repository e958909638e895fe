"""Splits a labelled dataset into a test set, the cloud's public slice, a validation set held out
of the clients' data (for tuning, never the test set) and per-client shards.

Everything is drawn from one `np.random.default_rng(seed)` stream, so a seed fully determines the
partition and nothing depends on (or disturbs) global random state.
"""

import dataclasses
import json
import os
import zipfile
from typing import Union

import numpy as np

from cooperllm_jax.errors import ConfigError, DataError
from cooperllm_jax.io import save_npz_atomic

SCHEMES = ('iid', 'dirichlet')


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy fields make `==` ambiguous.
class Partition:
  """Sorted int64 index arrays into the dataset; the sets are disjoint and cover it.

  Attributes:
    clients: one int64 index array per client (its shard).
    public: int64 indices of the cloud's public set.
    test: int64 indices of the test set.
    meta: the partition's settings (scheme, alpha, seed, fractions, sizes; 'tries' for
      Dirichlet).
    validation: int64 indices of the held-out validation set (empty when not requested).
  """
  clients: tuple[np.ndarray, ...]
  public: np.ndarray
  test: np.ndarray
  meta: dict
  validation: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

  @property
  def num_clients(self) -> int:
    return len(self.clients)

  def client_label_histogram(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Returns per-client class counts, int64 [num_clients, num_classes]."""
    labels = np.asarray(labels)
    if labels.size and labels.max() >= num_classes:
      raise ValueError(f'label {labels.max()} is out of range for {num_classes} classes')
    return np.stack([np.bincount(labels[c], minlength=num_classes) for c in self.clients])

  def save(self, path: Union[str, os.PathLike]) -> None:
    """Writes an .npz atomically, so an interrupted run never leaves a truncated partition."""
    arrays = {f'client_{i:05d}': c for i, c in enumerate(self.clients)}
    arrays.update(public=self.public, test=self.test, validation=self.validation,
                  meta=np.asarray(json.dumps(self.meta)))
    save_npz_atomic(path, arrays)

  @classmethod
  def load(cls, path: Union[str, os.PathLike]) -> 'Partition':
    """Reads a partition written by `save`."""
    try:
      with np.load(path, allow_pickle=False) as z:
        names = sorted(k for k in z.files if k.startswith('client_'))
        return cls(clients=tuple(z[k].astype(np.int64) for k in names),
                   public=z['public'].astype(np.int64), test=z['test'].astype(np.int64),
                   meta=json.loads(str(z['meta'])),
                   validation=(z['validation'].astype(np.int64) if 'validation' in z.files
                               else np.zeros(0, np.int64)))
    except FileNotFoundError:
      raise DataError(f'{path}: no such partition file') from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      raise DataError(f'{path}: not a partition file ({type(e).__name__}: {e})') from None


def _stratified_split(labels: np.ndarray, fractions: tuple[float, ...],
                      rng: np.random.Generator) -> tuple[np.ndarray, ...]:
  """Takes round(fraction * class size) of every class for each fraction in turn; the rest is the
  pool (last). One permutation per class, so a zero fraction leaves the other draws unchanged."""
  parts = [[] for _ in range(len(fractions) + 1)]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    cuts = np.cumsum([round(f * len(idx)) for f in fractions])
    for part, piece in zip(parts, np.split(idx, cuts)):
      part.append(piece)
  return tuple(np.sort(np.concatenate(s)).astype(np.int64) for s in parts)


def _dirichlet_split(pool: np.ndarray, pool_labels: np.ndarray, num_clients: int, alpha: float,
                     min_client_size: int, max_tries: int,
                     rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
  """Label-skew split (Hsu et al. 2019): per class, client shares ~ Dir(alpha); redraw if too small."""
  for tries in range(1, max_tries + 1):
    shards = [[] for _ in range(num_clients)]
    for c in np.unique(pool_labels):
      idx = rng.permutation(pool[pool_labels == c])
      p = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
      for shard, part in zip(shards, np.split(idx, cuts)):
        shard.append(part)
    clients = [np.concatenate(s) for s in shards]
    if min(len(c) for c in clients) >= min_client_size:
      return clients, tries
  raise ConfigError(f'min_client_size={min_client_size} not reached in {max_tries} Dirichlet draws '
                    f'with alpha={alpha} and num_clients={num_clients}; raise alpha or lower either')


def make_partition(labels: np.ndarray, *, num_clients: int, scheme: str = 'iid',
                   alpha: float = 0.5, test_fraction: float = 0.2, public_fraction: float = 0.05,
                   validation_fraction: float = 0.0, min_client_size: int = 2, seed: int = 0,
                   max_tries: int = 1000) -> Partition:
  """Splits indices 0..N-1 into stratified test, public and validation sets, and `num_clients`
  client shards (the validation set is held out of what the clients would otherwise hold).

  The public slice is stratified so the cloud sees the task's label mix. Clients split the rest
  either iid (nearly equal shards) or with Dirichlet(alpha) label skew (smaller alpha, more skew).

  Args:
    labels: 1-D integer array [N] of the dataset's labels.
    num_clients: how many client shards (>= 1).
    scheme: 'iid' or 'dirichlet'.
    alpha: the Dirichlet concentration (> 0), used with scheme='dirichlet'.
    test_fraction: share of the examples in the test set, in [0, 1).
    public_fraction: share in the cloud's public set, in [0, 1).
    validation_fraction: share in the validation set, in [0, 1); the three sum to < 1.
    min_client_size: the fewest examples a client may hold (Dirichlet draws are retried).
    seed: seed of the numpy generator behind every split.
    max_tries: how many Dirichlet draws to try before raising ConfigError.

  Returns:
    The Partition, its index arrays sorted int64.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not labels.size or not np.issubdtype(labels.dtype, np.integer):
    raise ConfigError(f'labels must be a non-empty 1-D integer array, got {labels.dtype} '
                      f'{labels.shape}')
  if scheme not in SCHEMES:
    raise ConfigError(f'unknown partition scheme {scheme!r}; choose one of {", ".join(SCHEMES)}')
  if num_clients < 1:
    raise ConfigError(f'num_clients must be >= 1, got {num_clients}')
  if not alpha > 0:
    raise ConfigError(f'alpha must be > 0, got {alpha}')
  fractions = {'test_fraction': test_fraction, 'public_fraction': public_fraction,
               'validation_fraction': validation_fraction}
  for name, frac in fractions.items():
    if not 0 <= frac < 1:
      raise ConfigError(f'{name} must be in [0, 1), got {frac}')
  if sum(fractions.values()) >= 1:
    raise ConfigError(f'{" + ".join(fractions)} must be < 1, got '
                      f'{" + ".join(str(f) for f in fractions.values())}')
  if min_client_size < 0:
    raise ConfigError(f'min_client_size must be >= 0, got {min_client_size}')
  if max_tries < 1:
    raise ConfigError(f'max_tries must be >= 1, got {max_tries}')

  rng = np.random.default_rng(seed)
  test, public, validation, pool = _stratified_split(
      labels, (test_fraction, public_fraction, validation_fraction), rng)
  if num_clients * min_client_size > len(pool):
    raise ConfigError(f'{num_clients} clients x min_client_size={min_client_size} exceeds the '
                      f'{len(pool)} samples left for clients')
  meta = dict(scheme=scheme, alpha=float(alpha), seed=int(seed), num_clients=int(num_clients),
              test_fraction=float(test_fraction), public_fraction=float(public_fraction),
              validation_fraction=float(validation_fraction), min_client_size=int(min_client_size), num_samples=len(labels))
  if scheme == 'iid':
    clients = np.array_split(rng.permutation(pool), num_clients)
  else:
    clients, meta['tries'] = _dirichlet_split(pool, labels[pool], num_clients, alpha,
                                              min_client_size, max_tries, rng)
  return Partition(clients=tuple(np.sort(c).astype(np.int64) for c in clients),
                   public=public, test=test, meta=meta, validation=validation)

"""The run's ledger on disk: every round's uploads as the edge received them, enough to rebuild the
global model from the pretrained one (experiments/replay.py).

    ledger/meta.json        algorithm, seed, whether the protocol is replayable, and the sha256 of
                            the base (pretrained) trainable weights the replay must start from;
    ledger/<round>.npz      one file per round (8 digits), written atomically:
        clients         int32 [C]          the sampled clients' ids
        addresses       int32 [C, S, P, 4] (round, client, step, probe) of every entry
        scalars         float32 [C, S, P]  as received (DP noise, attacks; rejected ones are 0)
        weights         float32 [C, S, P]  1/P for a used probe, 0 for padding or a rejected scalar
        client_weights  float32 [C]        the FedAvg weight the edge gave the client (0: absent)
        lr              float32            the round's learning rate
        guard           int8               GUARD_* : the divergence guard's verdict on the round
        guide_*         a guided round's guidance (algorithm.guide: cooperllm's; basis leaves in
                        tree order, valid, alpha, beta, probe_v, step_v), the dense payload its
                        replay needs.
Append-only: a round's file is never rewritten; resuming deletes the rounds after the checkpoint.
fedavg_bp's clients upload dense deltas, which the ledger does not keep: it is not replayable.
"""

import hashlib
import json
import pathlib
from typing import Optional
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from cooperllm_jax.errors import CheckpointError
from cooperllm_jax.federated.clients import Uplink
from cooperllm_jax.io import save_npz_atomic, write_text_atomic
from cooperllm_jax.zoo.guided import Guidance

GUARD_NONE, GUARD_ACCEPTED, GUARD_ROLLED_BACK = 0, 1, 2
_GUIDE = ('guide_valid', 'guide_alpha', 'guide_beta', 'guide_probe_v', 'guide_step_v',
          'guide_step_plain')
# Ledgers written before a field existed replay with its neutral value.
_GUIDE_DEFAULTS = {'guide_step_plain': np.float32(1.0)}


def _chain(digest: str, path: pathlib.Path) -> str:
  """The running sha256 after one more file (its name and bytes)."""
  return hashlib.sha256(f'{digest}|{path.name}|'.encode() + path.read_bytes()).hexdigest()


class Ledger:
  """`sha256` chains meta.json and every record written so far; checkpoints keep it, so a resume
  can tell whether the ledger up to its checkpoint is still the one the run wrote (`verify`)."""

  def __init__(self, directory):
    self.directory = pathlib.Path(directory)
    self.sha256 = None

  def _path(self, round_index: int) -> pathlib.Path:
    return self.directory / f'{round_index:08d}.npz'

  def start(self, meta: dict) -> None:
    self.directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(self.directory / 'meta.json', json.dumps(meta, indent=2))
    self.sha256 = _chain('', self.directory / 'meta.json')

  def meta(self) -> dict:
    try:
      return json.loads((self.directory / 'meta.json').read_text())
    except (OSError, ValueError) as e:
      raise CheckpointError(f'{self.directory}: no readable ledger meta.json ({e})') from None

  def append(self, round_index: int, clients, result, lr, guide, guard: int) -> None:
    up = result.uplink
    arrays = {'clients': np.asarray(clients, np.int32), 'addresses': up.addresses,
              'scalars': up.scalars, 'weights': up.weights,
              'client_weights': result.client_weights, 'lr': np.asarray(lr, np.float32),
              'guard': np.int8(guard)}
    if guide is not None:
      for i, leaf in enumerate(jax.tree.leaves(guide.basis)):
        arrays[f'guide_basis_{i}'] = np.asarray(leaf)
      arrays.update(zip(_GUIDE, (np.asarray(x) for x in guide[1:])))
    save_npz_atomic(self._path(round_index), arrays)
    self.sha256 = _chain(self.sha256, self._path(round_index))

  def verify(self, upto: int, expected: Optional[str]) -> Optional[str]:
    """None when meta.json and the records up to round `upto` chain to `expected` (appends then
    continue the chain), else why the ledger cannot be continued."""
    digest = ''
    paths = [self.directory / 'meta.json', *(self._path(r) for r in self.rounds() if r <= upto)]
    for path in paths:
      try:
        digest = _chain(digest, path)
      except OSError as e:
        return f'ledger {path} is unreadable ({e.strerror or e})'
    if digest != expected:
      return (f'the ledger in {self.directory} up to round {upto} is not the one the run wrote '
              '(a record is damaged, missing or replaced)')
    self.sha256 = digest
    return None

  def rounds(self) -> list:
    return sorted(int(p.stem) for p in self.directory.glob('[0-9]' * 8 + '.npz'))

  def truncate(self, after: int) -> None:
    for r in self.rounds():
      if r > after:
        self._path(r).unlink(missing_ok=True)

  def read(self, round_index: int, guide_template=None) -> dict:
    """One round's record; with guide_template (a Guidance of the run's structure) its 'guide' is
    rebuilt as a Guidance."""
    path = self._path(round_index)
    try:
      with np.load(path, allow_pickle=False) as z:
        record = {k: z[k] for k in z.files}
      if guide_template is not None:
        leaves = [record.pop(f'guide_basis_{i}')
                  for i in range(len(jax.tree.leaves(guide_template.basis)))]
        basis = jax.tree.unflatten(jax.tree.structure(guide_template.basis), leaves)
        record['guide'] = Guidance(basis, *(record.pop(k) if k in record else _GUIDE_DEFAULTS[k]
                                            for k in _GUIDE))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      raise CheckpointError(f'{path}: corrupt ledger record ({type(e).__name__}: {e})') from None
    return record


def rebuild(ledger: Ledger, edge, state, guide_template=None):
  """Yields (round, state) after every round of the ledger: the edge's updates replayed from the
  base state (an api.ServerState; its frozen weights are not needed), at each round's recorded
  rate, following the divergence guard's verdicts (accepted: the state that entered the round
  becomes the one to return to; rolled back: return to it). edge: the run's
  algorithm.edge_update (it may donate its first argument: use each yielded state before the
  next)."""
  good = jax.tree.map(jnp.copy, state)
  for expected, r in enumerate(ledger.rounds(), 1):
    if r != expected:
      raise CheckpointError(f'{ledger.directory}: round {expected} is missing from the ledger')
    record = ledger.read(r, guide_template)
    if record['guard'] == GUARD_ACCEPTED:
      good = jax.tree.map(jnp.copy, state)
    if record['guard'] == GUARD_ROLLED_BACK:
      state = jax.tree.map(jnp.copy, good)
    else:
      uplink = Uplink(record['addresses'], record['scalars'], record['weights'])
      state = edge(state._replace(lr=jnp.asarray(record['lr'])), uplink, record['client_weights'],
                   record.get('guide'))
    yield r, state

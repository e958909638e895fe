"""Orbax checkpoints of a run, written atomically and checked on restore.

A checkpoint at round r holds two items: `state`, a pytree of arrays (the algorithm's ServerState
without its frozen weights, which are a pure function of the pretrained model and the seed, and
the divergence guard's last good state), and `meta`, JSON (the round, the training-relevant config,
the seed, hashes of the base model and of the data, the downlink tracker, the guard's losses, the
privacy releases, train seconds) together with the sha256 of every array of `state` and of its
layout (every leaf's path, dtype and shape). A checkpoint whose layout is not the one this version
restores (the untyped dict states of earlier versions) is refused in one line.

Atomicity is orbax's: CheckpointManager writes step r into a temporary directory and renames it
to `r` only when both items are complete (the rename is atomic on a local file system), so a
crash mid-write leaves a tmp directory that is never listed as a step. On top of that, `restore`
recomputes the sha256 of what it read and compares it with the one in `meta`: a step whose files
were damaged afterwards (or any step that fails to read) is skipped with a log line and the next
older one is tried. Saves are synchronous: a round's state is donated by the next round.
"""

import hashlib
import json
import logging
import os
import pathlib
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import CheckpointError
from cooperllm_jax.federated.api import ServerState
from cooperllm_jax.federated.ledger import Ledger

# Config fields that do not change what a run computes: a resumed run may change them.
NOT_TRAINING = frozenset({'rounds', 'eval_every', 'eval_batch_size', 'tensorboard',
                          'checkpoint_every', 'keep_checkpoints'})


def _host(x) -> np.ndarray:
  """A leaf's full value on this host (gathered from the other processes if it is split)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def tree_sha256(tree) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (tree order)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = _host(leaf)
    h.update(f'{jax.tree_util.keystr(path)}|{x.dtype.str}|{x.shape}|'.encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def tree_layout(tree) -> str:
  """sha256 over every leaf's path, dtype and shape (tree order): the tree's layout, not its
  values (a template of ShapeDtypeStructs has its tree's)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(f'{jax.tree_util.keystr(path)}|{np.dtype(leaf.dtype).str}|{tuple(leaf.shape)}|'
             .encode())
  return h.hexdigest()


def training_config(config) -> dict:
  """The config as JSON data in today's layout (config.canonical), without the fields that do not
  change what a run computes."""
  return {k: v for k, v in config_lib.canonical(json.loads(config.to_json())).items()
          if k not in NOT_TRAINING}


def config_differences(saved: dict, current: dict, prefix: str = '') -> list:
  """['name: saved -> current', ...] for every (nested) field that differs."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return out


ORBAX_DIR = os.path.dirname(ocp.__file__)


def _raised_in(error: Optional[BaseException], directory: str) -> bool:
  """Whether a frame of `error`'s traceback, or of an exception it was raised from, is a file
  under `directory`."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    tb = error.__traceback__
    while tb is not None:
      if tb.tb_frame.f_code.co_filename.startswith(directory + os.sep):
        return True
      tb = tb.tb_next
    error = error.__cause__ or error.__context__
  return False


class _UnretrievedReadErrors(logging.Filter):
  """Drops asyncio's '... exception was never retrieved' for failures raised inside orbax. When
  one array of a damaged step fails to read, the restore raises (restore() logs one line and skips
  the step) while the step's other reads may fail later, unawaited; asyncio would print each one's
  traceback when its task or gather is collected, at a time that depends on the garbage collector."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not ('exception was never retrieved' in record.getMessage() and record.exc_info
                and _raised_in(record.exc_info[1], ORBAX_DIR))


UNRETRIEVED_READ_ERRORS = _UnretrievedReadErrors()


class Checkpointer:
  """Numbered checkpoints of one run in `directory`, the newest `keep` kept."""

  def __init__(self, directory, keep: int = 3, log: Callable = print):
    self.directory = pathlib.Path(directory).absolute()
    self.log = log
    logging.getLogger('asyncio').addFilter(UNRETRIEVED_READ_ERRORS)   # once: filters are a set
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list:
    return sorted(self._manager.all_steps())

  def save(self, round_index: int, tree, meta: dict) -> None:
    meta = dict(meta, round=round_index, state_sha256=tree_sha256(tree),
                layout_sha256=tree_layout(tree))
    self._manager.save(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, template, check: Optional[Callable] = None, upto: Optional[int] = None):
    """(round, tree, meta) of the newest step (at most `upto`) that reads back with its hash;
    `template` gives the tree's structure, shapes and dtypes; check(meta) may raise a
    CheckpointError for a checkpoint of another run, which is not skipped, or return why this
    step cannot be used, which is. A step of another layout than `template`'s is a
    CheckpointError. None if no step."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    layout = tree_layout(abstract)
    for step in reversed(self.steps()):
      if upto is not None and step > upto:
        continue
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step is skipped
        self.log(f'checkpoint {step}: unreadable metadata ({type(e).__name__}); '
                 'trying an older one')
        continue
      reason = check(meta) if check is not None else None
      if reason:
        self.log(f'checkpoint {step}: {reason}; trying an older one')
        continue
      if meta.get('layout_sha256') != layout:
        raise CheckpointError(f'{self.directory / str(step)} holds an algorithm state of another '
                              'layout than this version restores (earlier versions wrote untyped '
                              'dict states): rerun it with this version')
      try:
        tree = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
      except Exception as e:  # pylint: disable=broad-except
        self.log(f'checkpoint {step}: unreadable ({type(e).__name__}: {str(e)[:120]}); '
                 'trying an older one')
        continue
      if tree_sha256(tree) != meta.get('state_sha256'):
        self.log(f'checkpoint {step}: arrays do not match their saved sha256; trying an older one')
        continue
      return step, tree, meta
    return None

  def delete_after(self, round_index: int) -> None:
    """Removes steps newer than round_index (a crashed run's, or damaged ones) before resuming."""
    for step in self.steps():
      if step > round_index:
        self._manager.delete(step)

  def close(self) -> None:
    self._manager.close()


def without_frozen(state: ServerState) -> ServerState:
  """The state to save: the frozen weights follow from the pretrained model and the seed."""
  return state._replace(frozen=None)


def template(state: ServerState, good: bool) -> dict:
  """The structure of a run's checkpoint tree: the state without its frozen weights and, with
  the divergence guard on, the guard's last good state."""
  tree = {'state': without_frozen(state)}
  if good:
    tree['good'] = tree['state']
  return tree


class RunStore:
  """What a run keeps to resume and to be audited: checkpoints every `checkpoint_every` rounds (and
  at the last) and the ledger. `identity` (training config, seed, hashes of the pretrained model
  and of the data) is saved with every checkpoint; a checkpoint of another identity is an error."""

  def __init__(self, workdir, spec: config_lib.Checkpoint, identity: dict,
               log: Callable = print):
    workdir = pathlib.Path(workdir)
    self.every = spec.every
    self.identity = identity
    self.checkpoints = (Checkpointer(workdir / 'checkpoints', spec.keep, log) if self.every
                        else None)
    self.ledger = Ledger(workdir / 'ledger') if spec.ledger else None

  def check(self, meta: dict) -> Optional[str]:
    """CheckpointError naming what differs between this run and a checkpoint's; or why this
    checkpoint cannot be continued from (written by an older version, or the ledger up to it is
    not the one the run wrote), to try an older one."""
    diffs = config_differences(config_lib.canonical(meta.get('config', {})),
                               self.identity['config'])
    if diffs:
      raise CheckpointError('cannot resume: the config differs from the checkpointed run in '
                            + '; '.join(diffs[:4]) + (' ...' if len(diffs) > 4 else ''))
    for key, what in (('seed', 'seed'), ('base_sha256', 'pretrained weights'),
                      ('data_sha256', 'data (texts, tokens or partition)')):
      if meta.get(key) != self.identity[key]:
        raise CheckpointError(f'cannot resume: the {what} differ from the checkpointed run\'s')
    if 'before' not in meta:
      return 'written by an older version of cooperllm_jax'
    if self.ledger is not None:
      return self.ledger.verify(meta['round'], meta.get('ledger_sha256'))
    return None

  def due(self, round_index: int, last: int) -> bool:
    return bool(self.every) and (round_index % self.every == 0 or round_index == last)

  def save(self, round_index: int, state, good, meta: dict) -> None:
    tree = template(state, good is not None)
    if good is not None:
      tree['good'] = without_frozen(good)
    self.checkpoints.save(round_index, tree, dict(
        meta, **self.identity, ledger_sha256=self.ledger.sha256 if self.ledger else None))

  def restore(self, state, good: bool):
    """(round, state, good state or None, meta) from the newest good checkpoint; the frozen
    weights come from `state` (the run's initial state). Later checkpoints and ledger rounds (a
    crashed run's) are deleted."""
    if self.checkpoints is None:
      raise CheckpointError('cannot resume: checkpoint_every is 0, so the run saved no checkpoints')
    found = self.checkpoints.restore(template(state, good), check=self.check)
    if found is None:
      self.checkpoints.close()   # an open manager left to the interpreter's exit prints tracebacks
      raise CheckpointError(f'cannot resume: no usable checkpoint in {self.checkpoints.directory} '
                            '(see the lines above); start over with --overwrite')
    round_index, tree, meta = found
    self.checkpoints.delete_after(round_index)
    if self.ledger is not None:
      self.ledger.truncate(round_index)
    return (round_index, tree['state']._replace(frozen=state.frozen),
            tree['good']._replace(frozen=state.frozen) if good else None, meta)

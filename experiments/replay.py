r"""Rebuilds a run's global model from the pretrained weights and its ledger, and checks it.

  python -m experiments.replay --workdir=workdir/demo

Reads the run's config.json (its algorithm_module imported, so an algorithm in a user's code
replays too), loads its model and data (the base weights and the edge's settings come from them),
checks the ledger's sha256 of the base trainable weights, replays every round with the run's own
edge update (`algorithm.edge_update`: the same jitted code on the same inputs, the algorithm's own
state with it) and compares the rebuilt trainable weights with every checkpoint kept in
workdir/checkpoints. The comparison is bitwise: the edge is deterministic on a given machine and
backend, so any difference is a corrupt or mismatched ledger (a resumed run's ledger replays like
an uninterrupted one's). Prints one `replay:` line; an algorithm that is not replayable
(`replayable = False`: fedavg_bp, cloud_only, warm_start), a mismatch, a missing round or a corrupt
record prints one `error:` line and exits 2.
"""

import json
import pathlib

from absl import flags

from cooperllm_jax import cli
from cooperllm_jax.errors import CheckpointError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run directory written by experiments.train.',
                               required=True)


def _first_difference(a, b) -> str:
  """'' when the trees are bitwise equal, else where and by how much they differ."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      gap = np.abs(x.astype(np.float64) - y.astype(np.float64)).max() if x.shape == y.shape else -1
      return f'{jax.tree_util.keystr(path)} differs by up to {gap:.3g}'
  return ''


def replay(workdir, log=print) -> str:
  """Replays the run in `workdir`; returns the summary line, raises CheckpointError on mismatch."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.federated import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.federated import registry  # pylint: disable=g-import-not-at-top
  from cooperllm_jax.run import loop  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  try:
    config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  except (OSError, ValueError):
    raise CheckpointError(f'{workdir} holds no run (no readable config.json)') from None
  cfg = config_lib.parse(config)
  if not registry.lookup(cfg.algorithm).replayable:
    raise CheckpointError(f'{cfg.algorithm} is not replayable: the ledger does not hold all its '
                          'updates (its class sets replayable = False)')
  ledger = ledger_lib.Ledger(workdir / 'ledger')
  meta = ledger.meta()
  if not (workdir / 'checkpoints').is_dir():
    raise CheckpointError(f'{workdir} has no checkpoints to compare the replay with '
                          '(checkpoint_every was 0)')
  task, algorithm = loop.prepare(cfg)
  state = algorithm.init(task.pre.params)
  if checkpoint_lib.tree_sha256(state.trainable) != meta['base_trainable_sha256']:
    raise CheckpointError('the pretrained trainable weights differ from the ones the ledger '
                          'started from (another model, seed or asset version)')
  checkpoints = checkpoint_lib.Checkpointer(workdir / 'checkpoints', log=log)
  template = checkpoint_lib.template(state, cfg.guard.active)
  targets = {}
  try:
    for step in checkpoints.steps():
      found = checkpoints.restore(template, upto=step)
      if found is not None and found[0] == step:
        targets[step] = found[1]['state'].trainable
  finally:
    checkpoints.close()   # before any error: an open manager left to the exit prints tracebacks
  if not targets:
    raise CheckpointError(f'no readable checkpoint in {workdir / "checkpoints"} to compare with')
  verified, last = [], 0
  for r, rebuilt in ledger_lib.rebuild(ledger, algorithm.edge_update,
                                       state._replace(frozen=None), algorithm.guide(state)):
    last = r
    if r in targets:
      diff = _first_difference(rebuilt.trainable, targets[r])
      if diff:
        raise CheckpointError(f'round {r}: the model rebuilt from the ledger differs from '
                              f'checkpoint {r}: {diff}')
      verified.append(r)
  missing = sorted(set(targets) - set(verified))
  if missing:
    raise CheckpointError(f'the ledger ends at round {last}, before checkpoints {missing}')
  return (f'replay: {meta["algorithm"]}, {last} ledger rounds replayed from the pretrained '
          f'weights (sha256 ok); equal bit for bit to checkpoints {", ".join(map(str, verified))}')


def main(argv):
  del argv  # cli.run refuses positional arguments
  with cli.main_errors():
    print(replay(_WORKDIR.value))


if __name__ == '__main__':
  cli.run(main)

"""`train_and_evaluate(config, workdir)`: one federated run, importable; the flags are the CLI's
(cooperllm_jax/train.py), never read here.

Loads the model and data named by the config, partitions the data over simulated clients, runs the
rounds of the configured algorithm and writes to `workdir`: config.json, partition.npz,
metrics.jsonl (one line per round: accuracy, loss, bytes up/down, passes, client memory, wall time,
and the simulated wall clock of the configured devices, sim_round_s / sim_time_s: system/clock.py),
TensorBoard events (tb/, the same scalars grouped as train/, test/, comm/, sim/, cloud/),
accuracy.png (reporting.plot_run) and summary.json (the result, the chance level, and what produced
it: run/provenance.py). Returns the summary dict. Rounds are numbered from 1; round 0 is the
pretrained model's evaluation.

The loop itself is short: everything around a round is a hook (run/hooks.py) over one RunState
(run/state.py). Checkpoints (orbax, every `checkpoint_every` rounds; `resume=True` goes on from the
newest good one, bit for bit as if never interrupted), the ledger (experiments/replay.py rebuilds
the model from it), the channel's faults and DP, and the divergence guard: see those modules.
"""

import json
import os
import pathlib
import time
from typing import Callable, Optional, Union

import jax
import ml_collections
import numpy as np

from cooperllm_jax import checkpoint as checkpoint_lib
from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import CheckpointError, ConfigError
from cooperllm_jax.evaluation import evaluate, majority_rate
from cooperllm_jax.federated import client_data
from cooperllm_jax.federated import registry
from cooperllm_jax.federated.accounting import DownlinkTracker
from cooperllm_jax.federated.privacy import GaussianPrivacy
from cooperllm_jax.models import count_params
from cooperllm_jax.reporting import (MetricWriter, NullWriter, file_errors, to_json,
                                     truncate_metrics, write_text)
from cooperllm_jax.run import hooks as hooks_lib
from cooperllm_jax.run import sizes
from cooperllm_jax.run import workdir as workdir_lib
from cooperllm_jax.run.provenance import provenance
from cooperllm_jax.run.guard import DivergenceGuard
from cooperllm_jax.run.state import RunState
from cooperllm_jax.run.task import Task, load_task
from cooperllm_jax.system.clock import SimulatedClock

import cooperllm_jax.federated.algorithms  # pylint: disable=unused-import  # registers them


def check_resumable(workdir, config) -> pathlib.Path:
  """A workdir holding a run of this config (fast: before any model or data is loaded)."""
  path = pathlib.Path(workdir)
  try:
    saved = json.loads((path / 'config.json').read_text())
  except (OSError, ValueError):
    raise CheckpointError(f'cannot resume: {path} holds no run (no readable config.json)') from None
  diffs = checkpoint_lib.config_differences(
      {k: v for k, v in config_lib.canonical(saved).items()
       if k not in checkpoint_lib.NOT_TRAINING}, checkpoint_lib.training_config(config))
  if diffs:
    raise CheckpointError('cannot resume: the config differs from the run in the workdir in '
                          + '; '.join(diffs[:4]) + (' ...' if len(diffs) > 4 else ''))
  if config.rounds < saved.get('rounds', 0):   # a resume finishes or extends a run, never cuts it
    raise CheckpointError(f'cannot resume: the run in {path} has rounds={saved["rounds"]}, and '
                          f'rounds={config.rounds} would end it earlier; pass rounds >= '
                          f'{saved["rounds"]}')
  return path


def prepare(cfg: config_lib.RunConfig):
  """(task, algorithm) of a parsed config: user errors in the model, data or algorithm settings
  surface here, before anything is written."""
  cls = registry.lookup(cfg.algorithm)
  task = load_task(cfg, needs_public=cls.needs_public)
  return task, cls.from_config(cfg, task.model, task.public)


def start_state(cfg, task: Task, algorithm) -> RunState:
  """The RunState before round 1, its clock sized by the algorithm's costs."""
  state = algorithm.init(task.pre.params)
  clock = SimulatedClock.for_run(cfg, algorithm.costs, task.model, state.trainable)
  algorithm.attach_clock(clock)
  return RunState(state, DownlinkTracker(task.partition.num_clients,
                                         algorithm.dense_bytes(state), algorithm.sync_bytes),
                  clock, np.zeros(task.partition.num_clients, np.int64),
                  DivergenceGuard.of(cfg.guard))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Union[str, os.PathLike],
                       overwrite: bool = False, log: Callable[[str], None] = print,
                       progress: Optional[Callable] = None, resume: bool = False,
                       run_clients: Optional[Callable] = None) -> dict:
  """Runs config in workdir and returns the summary. Every check of the config, the model and
  the data (their sizes too: run/sizes.py) runs before anything is written to workdir.

  Args:
    config: a ConfigDict of cooperllm_jax/configs/default.py's layout.
    workdir: the run's folder (config.json, partition.npz, metrics, checkpoints, summary.json).
    overwrite: replace an existing run in workdir (not together with resume).
    log: takes each progress line.
    progress: progress(iterable) may wrap the rounds (e.g. tqdm); None: no wrapper.
    resume: continue the run in workdir from its newest good checkpoint (same training config
      required, as many rounds or more).
    run_clients: a transport's clients (cooperllm_jax/deploy): run_clients(state, messages,
      batches) -> Replies takes the place of the Deployable algorithm's in-process run_clients
      between its prepare and apply; None runs the algorithm's run_round.

  Returns:
    The summary dict (also written to workdir/summary.json by process 0): algorithm, model,
    dataset, rounds, accuracy_before, accuracy_after, val_accuracy_after, rollbacks, the
    example counts, chance_accuracy, train_seconds, client_memory_bytes, sim_time_s, system,
    backend and the run's provenance.
  """
  cfg = config_lib.parse(config)
  primary = jax.process_index() == 0  # a multi-process run: all compute, process 0 writes
  workdir = open_workdir(config, workdir, overwrite, resume, primary)
  task, algorithm = prepare(cfg)
  cfg = sizes.fit(cfg, task, algorithm, log)
  run = start_state(cfg, task, algorithm)
  if primary and not resume:   # every check passed: the workdir is written from here on
    workdir_lib.prepare(workdir)
    write_text(workdir / 'config.json', config.to_json(indent=2))
    with file_errors(workdir / 'partition.npz'):
      task.partition.save(workdir / 'partition.npz')
  store = checkpoint_lib.RunStore(workdir, cfg.checkpoint, {
      'config': checkpoint_lib.training_config(config), 'seed': cfg.seed,
      'base_sha256': checkpoint_lib.tree_sha256(task.pre.params),
      'data_sha256': task.fingerprint()}, log)
  log(describe(cfg, task, algorithm, run))
  shapes = client_data.round_shapes(task.arrays, cfg.local_steps, cfg.batch_size)
  client_memory = algorithm.client_memory(run.state, shapes)['peak_bytes']
  warn_memory(client_memory, run.clock, log)
  on = lambda split: (lambda params: evaluate(task.model, params, task.arrays, task.labels, split,
                                               cfg.eval_batch_size))
  validation = task.partition.validation
  evaluation = hooks_lib.Evaluation(on(task.partition.test), algorithm.model_params,
                                    cfg.eval_every, cfg.rounds,
                                    on(validation) if len(validation) else None)
  before = (resumed(run, store, workdir, primary, log) if resume
            else first_evaluation(run, evaluation, store, algorithm, cfg, primary, log))
  if resume and primary:   # restored: the run's config.json now holds its (possibly more) rounds
    write_text(workdir / 'config.json', config.to_json(indent=2))
  if run.guard is not None:
    run.guard.reference = before['loss']   # a blow-up is judged against the starting model
  title = f'{cfg.algorithm} on {task.dataset.name} with {cfg.model.name}'
  chance = majority_rate(task.labels, task.partition.test)
  # Every file the rounds write is in the workdir: a failed write that names none names it.
  with file_errors(workdir), (MetricWriter(workdir, title=title, tensorboard=cfg.tensorboard,
                                           chance=chance) if primary else NullWriter()) as writer:
    if not resume:
      writer.write({'round': 0, 'test_accuracy': before['accuracy'], 'test_loss': before['loss'],
                    'sim_time_s': 0.0})
    hooks = round_hooks(cfg, writer, store, primary, client_memory, evaluation, log)
    started, ran = time.perf_counter(), None
    rounds = range(run.round + 1, cfg.rounds + 1)
    for r in (progress(rounds) if progress else rounds):
      ran = ctx = hooks_lib.RoundContext(r, None, float(run.state.lr), {'round': r})
      ctx.sampled, batches, counts = task.round_inputs(cfg, r, algorithm.mesh)
      for hook in hooks:
        hook.before_round(run, ctx)
      if run_clients is None:
        run.state, ctx.result = algorithm.run_round(run.state, batches, counts, ctx.sampled, r)
      else:   # the round split at the transport (docs/engine.md)
        run.state, ctx.result = algorithm.run_round_through(run_clients, run.state, batches,
                                                            counts, ctx.sampled, r)
      ctx.guide, run.round = algorithm.guide(run.state), r
      for hook in hooks:
        hook.after_round(run, ctx)
  if ran is None:   # a resume of a finished run: its last round is evaluated as the loop does
    ran = hooks_lib.RoundContext(run.round, None, float(run.state.lr), {'round': run.round})
    evaluation.after_round(run, ran)
  summary = {'algorithm': cfg.algorithm, 'model': cfg.model.name, 'dataset': task.dataset.name,
             'rounds': cfg.rounds, 'accuracy_before': before['accuracy'],
             'accuracy_after': ran.row['test_accuracy'],
             'val_accuracy_after': ran.row.get('val_accuracy'),
             'rollbacks': run.guard.rollbacks if run.guard is not None else 0,
             'test_examples': before['examples'], 'validation_examples': len(validation),
             'chance_accuracy': chance,
             'train_seconds': run.seconds_before + time.perf_counter() - started,
             'client_memory_bytes': client_memory, 'sim_time_s': run.clock.elapsed,
             'system': {'clients': cfg.system.clients, 'edge': cfg.system.edge,
                        'cloud': cfg.system.cloud, 'pipelined': bool(cfg.system.pipelined)},
             'backend': jax.default_backend(), **provenance()}
  if primary:
    write_text(workdir / 'summary.json', to_json(summary, indent=2))
  return summary


def open_workdir(config, workdir, overwrite: bool, resume: bool, primary: bool) -> pathlib.Path:
  """The run's workdir after the checks of a new run or a resume; nothing is written yet."""
  if resume and overwrite:
    raise ConfigError('--resume continues the run in the workdir and --overwrite replaces it: '
                      'pass one of them')
  if resume:
    return check_resumable(workdir, config)
  return workdir_lib.check(workdir, overwrite) if primary else pathlib.Path(workdir)


def describe(cfg, task: Task, algorithm, run: RunState) -> str:
  p = task.partition
  return (f'{cfg.algorithm}: model {cfg.model.name} ({count_params(task.pre.params) / 1e6:.1f}M '
          f'params, {algorithm.dense_bytes(run.state) / 4 / 1e6:.3g}M trainable); dataset '
          f'{task.dataset.name}: {len(task.dataset)} examples, {task.dataset.num_classes} '
          f'classes; {p.num_clients} clients, {len(task.public["labels"]) if task.public else len(p.public)} '
          f'public{" (" + cfg.cloud.public_dataset + ")" if cfg.cloud.public_dataset else ""}, '
          f'{len(p.validation)} validation, {len(p.test)} test')


def round_hooks(cfg, writer, store, primary: bool, client_memory: int, evaluation, log) -> list:
  """The hooks around every round, in order. Only process 0 writes the ledger; every process
  takes part in saving a checkpoint (orbax's multi-process save)."""
  hooks = [hooks_lib.Comms(client_memory), hooks_lib.Clock(), hooks_lib.Guard(log),
           hooks_lib.Privacy(GaussianPrivacy.of(cfg.dp, cfg.seed)), evaluation,
           hooks_lib.Metrics(writer, log)]
  if primary and store.ledger is not None:
    hooks.append(hooks_lib.Ledger(store.ledger))
  return hooks + [hooks_lib.Checkpoints(store, cfg.rounds)]


def warn_memory(client_memory: int, clock: SimulatedClock, log) -> None:
  small = min(clock.devices, key=lambda d: d.memory_bytes)
  if client_memory > small.memory_bytes:
    log(f'warning: a client step needs {client_memory / 2**20:.0f} MiB, more than the '
        f'{small.memory_gib:g} GiB of device profile {small.name!r}')


def first_evaluation(run, evaluation, store, algorithm, cfg, primary, log) -> dict:
  """Round 0: the pretrained model's test accuracy (kept with every checkpoint), and the ledger's
  start."""
  run.before = evaluation(run)
  log(f'round 0: test accuracy {run.before["accuracy"]:.4f} loss {run.before["loss"]:.4f}')
  if store.ledger is not None and primary:
    store.ledger.start({'algorithm': cfg.algorithm, 'seed': cfg.seed,
                        'replayable': algorithm.replayable,
                        'base_trainable_sha256': checkpoint_lib.tree_sha256(
                            run.state.trainable)})
  return run.before


def resumed(run, store, workdir, primary, log) -> dict:
  """Restores the RunState (the starting model's accuracy with it) and cuts metrics.jsonl back to
  its round, before the writer reopens the file."""
  run.restore(store)
  if primary and len(truncate_metrics(workdir / 'metrics.jsonl', run.round)) < run.round + 1:
    log(f'warning: {workdir / "metrics.jsonl"} lacks rows of rounds 0..{run.round}')
  log(f'resuming after round {run.round} (checkpoint in {workdir / "checkpoints"})')
  return run.before

"""What happens around each round of the run loop, as hooks (flax/clu's periodic actions are the
model): communication accounting, the simulated clock, the divergence guard, DP accounting,
evaluation, metrics, the ledger and checkpoints. Each hook reads and writes the round's
`RoundContext` (its metrics row above all) and the `RunState`; the loop calls them in order.
"""

import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np

from cooperllm_jax.errors import TrainingError
from cooperllm_jax.evaluation import evaluate
from cooperllm_jax.federated import ledger as ledger_lib
from cooperllm_jax.federated.api import RoundResult
from cooperllm_jax.run.guard import copy_state
from cooperllm_jax.run.state import RunState


@dataclasses.dataclass
class RoundContext:
  round: int
  sampled: np.ndarray           # the round's client ids
  lr: float                     # the rate the round ran at
  row: dict                     # the round's metrics row, filled by the hooks
  started: float = dataclasses.field(default_factory=time.perf_counter)
  result: Optional[RoundResult] = None
  sync_bytes: Optional[np.ndarray] = None  # [C] catch-up download of each sampled client
  guide: Any = None             # the round's guidance, before a rollback replaces the state
  train_loss: Optional[float] = None  # mean over the clients whose uploads arrived
  entering: Any = None          # a copy of the state that entered the round (the guard's)
  verdict: int = ledger_lib.GUARD_NONE


class Hook:
  """Called by the loop around every round; a hook overrides what it needs."""

  def before_round(self, run: RunState, ctx: RoundContext) -> None:
    del run, ctx

  def after_round(self, run: RunState, ctx: RoundContext) -> None:
    del run, ctx


@dataclasses.dataclass
class Comms(Hook):
  """Bytes over the links, passes on the clients, and the algorithm's own metrics."""
  client_memory: int

  def before_round(self, run, ctx):
    ctx.sync_bytes = run.downlink.download(ctx.sampled, ctx.round)

  def after_round(self, run, ctx):
    result = ctx.result
    run.downlink.record(ctx.round, result.broadcast_bytes)
    down = ctx.sync_bytes + result.guidance_bytes
    ctx.row.update(bytes_up=int(result.uplink_bytes.sum()), bytes_down=int(down.sum()),
                   bytes_up_per_client=float(result.uplink_bytes.mean()),
                   bytes_down_per_client=float(down.mean()),
                   forwards=int(result.forwards.sum()), backwards=int(result.backwards.sum()),
                   client_memory_bytes=self.client_memory, clients=ctx.sampled.tolist(),
                   learning_rate=float(ctx.lr))
    arrived = result.client_weights > 0  # the edge only hears the losses of these clients
    if arrived.any():
      ctx.train_loss = float(np.mean(result.losses[arrived]))


class Clock(Hook):
  """The round's latency on the simulated devices (system/clock.py)."""

  def after_round(self, run, ctx):
    result, n = ctx.result, len(ctx.sampled)
    sent = result.sent if result.sent is not None else np.ones(n, bool)
    probes = (np.zeros(n, np.int64) if result.uplink is None else
              (np.asarray(result.uplink.weights) != 0).reshape(n, -1).sum(1))
    clock = run.clock
    seconds = clock.tick(clock.plan(
        ctx.round, ctx.sampled, result.forwards, result.backwards, result.uplink_bytes,
        ctx.sync_bytes, sent, probes, result.client_weights > 0,
        result.metrics.get('guidance_formats'), bool(result.cloud_ran)))
    ctx.row.update(sim_round_s=seconds, sim_time_s=clock.elapsed, **result.metrics)


@dataclasses.dataclass
class Guard(Hook):
  """The divergence guard's verdict on the round (rolls back on a spike); without a guard a
  non-finite loss ends the run with a TrainingError."""
  log: Callable

  def before_round(self, run, ctx):
    if run.guard is not None:
      ctx.entering = copy_state(run.state)

  def after_round(self, run, ctx):
    loss = ctx.train_loss
    if loss is not None:
      ctx.row['train_loss'] = loss
    if run.guard is None:
      if loss is not None and not np.isfinite(loss):
        raise TrainingError(f'training loss is {loss} in round {ctx.round}; lower learning_rate '
                            f'(now {ctx.lr:g}) or set guard.spike to roll back instead')
      return
    run.state, rolled_back = run.guard.after_round(ctx.entering, run.state, loss, ctx.round)
    if rolled_back:
      ctx.verdict = ledger_lib.GUARD_ROLLED_BACK
      ctx.row['rollback'] = True
      self.log(f'round {ctx.round}: train loss {loss:.4g} spiked; rolled back, learning rate '
               f'{float(run.state.lr):g}')
    elif loss is not None:
      ctx.verdict = ledger_lib.GUARD_ACCEPTED


@dataclasses.dataclass
class Privacy(Hook):
  """Counts each client's uploads; with DP on, the worst client's epsilon."""
  privacy: Any                  # federated.privacy.GaussianPrivacy or None

  def after_round(self, run, ctx):
    sent = ctx.result.sent
    run.releases[ctx.sampled[sent]] += 1
    if self.privacy is not None:
      ctx.row['dp_epsilon'] = self.privacy.epsilon(int(run.releases.max()))


@dataclasses.dataclass
class Evaluation(Hook):
  """Test accuracy and loss every `every` rounds and after the last; after the last also the
  validation set's (val_accuracy, val_loss: what a sweep picks by) when the run holds one out."""
  evaluate: Callable            # params -> {'accuracy', 'loss', 'examples'} on the test set
  model_params: Callable        # state -> params
  every: int
  last: int
  validate: Optional[Callable] = None  # the same on the validation set

  def __call__(self, run) -> dict:
    return self.evaluate(self.model_params(run.state))

  def after_round(self, run, ctx):
    if ctx.round % self.every == 0 or ctx.round == self.last:
      params = self.model_params(run.state)
      ev = self.evaluate(params)
      ctx.row.update(test_accuracy=ev['accuracy'], test_loss=ev['loss'])
      if self.validate is not None and ctx.round == self.last:
        ev = self.validate(params)
        ctx.row.update(val_accuracy=ev['accuracy'], val_loss=ev['loss'])


@dataclasses.dataclass
class Metrics(Hook):
  """Writes the row (metrics.jsonl, TensorBoard) and the round's log line."""
  writer: Any
  log: Callable

  def after_round(self, run, ctx):
    row = ctx.row
    row['wall_s'] = time.perf_counter() - ctx.started
    self.writer.write(row)
    self.log(f'round {ctx.round}: train loss {row.get("train_loss", float("nan")):.4f}'
             + (f', test accuracy {row["test_accuracy"]:.4f}' if 'test_accuracy' in row else '')
             + f', {row["bytes_up_per_client"]:.0f} B up / {row["bytes_down_per_client"]:.0f} B'
             + f' down per client ({row["wall_s"]:.1f}s)')


@dataclasses.dataclass
class Ledger(Hook):
  """Appends what the edge received (the scalar protocols' ledger)."""
  ledger: ledger_lib.Ledger

  def after_round(self, run, ctx):
    if ctx.result.uplink is not None:
      self.ledger.append(ctx.round, ctx.sampled, ctx.result, ctx.lr, ctx.guide, ctx.verdict)


@dataclasses.dataclass
class Checkpoints(Hook):
  """The whole RunState every `store.every` rounds and at the last."""
  store: Any                    # checkpoint.RunStore
  last: int
  started: float = dataclasses.field(default_factory=time.perf_counter)

  def after_round(self, run, ctx):
    if self.store.due(ctx.round, self.last):
      run.save(self.store, time.perf_counter() - self.started)

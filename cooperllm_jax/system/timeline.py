"""SPC: one round of cloud-edge-end work as an event-driven timeline.

A round is a graph of tasks on serial resources: the cloud, the cloud->edge backbone, each client's
downlink, compute and uplink, and the edge. A resource runs one task at a time; a task starts when
its resource is free and every task it depends on has finished, plus that task's propagation delay
(a message occupies its link for bytes / bandwidth and arrives `latency` later, so a link can send
the next message while one is in flight). Ready tasks take a resource first come, first served.

Pipelined (SPC), every model stage is a message and a compute task of its own: the cloud codes the
guidance of stage l while stage l-1's is on a link and the client computes stage l-2. The
sequential schedule is the same graph with the stages merged into one (two if the model starts
with a shared prefix): every tier waits for the whole of the previous one. A shared prefix (the
frozen stages before the first trained one) runs once per local step, not once per probe pass: the
probes share its activations, as in the compiled client step (README, Benchmarks: a head-only ZO
step costs about one forward). With equal stages of duration e (cloud), t (each link) and c (client)
and no latencies, L stages take L (e + 2t + c) sequentially and e + 2t + c + (L - 1) max(e, t, c)
pipelined (tests check this).

What is not pipelined, and why: the cloud's backprop yields gradients top-down while clients consume
stages bottom-up, and the basis is orthonormalized across all stages, so the whole backprop precedes
the first message (cloud.lag=1 moves it off the critical path: it runs during the previous round).
Local steps after the first need every stage's guidance, so only the first step overlaps.
"""

import dataclasses
import heapq
from typing import Sequence

from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.system import workload as wl
from cooperllm_jax.system.profiles import DeviceProfile, link


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  resource: str
  duration: float
  deps: tuple = ()
  delay: float = 0.0     # after it ends, dependents wait this long more (a message's latency)
  kind: str = 'compute'  # compute | link | cloud | edge: for the chart's colours


@dataclasses.dataclass(frozen=True)
class Event:
  task: Task
  start: float
  end: float

  @property
  def arrival(self) -> float:
    return self.end + self.task.delay


def simulate(tasks: Sequence[Task]) -> dict[str, Event]:
  """Schedules `tasks` (a DAG; earlier tasks win ties for a resource) and returns name -> Event."""
  by_name = {}
  for i, task in enumerate(tasks):
    if task.name in by_name:
      raise ValueError(f'duplicate task {task.name!r}')
    if task.duration < 0 or task.delay < 0:
      raise ValueError(f'task {task.name!r} has a negative duration or delay')
    by_name[task.name] = i
  missing = {d for t in tasks for d in t.deps if d not in by_name}
  if missing:
    raise ValueError(f'unknown dependencies: {sorted(missing)}')
  waiting = {t.name: len(t.deps) for t in tasks}
  dependents = {t.name: [] for t in tasks}
  for t in tasks:
    for d in t.deps:
      dependents[d].append(t.name)
  ready_at = {t.name: 0.0 for t in tasks}
  free = {}                      # resource -> the time it becomes free
  events = {}
  # (earliest start, ready time, index): a popped key is stale if its resource got busy since
  # (free only grows, so a stale key is a lower bound and goes back with the true start).
  heap = [(0.0, 0.0, by_name[t.name]) for t in tasks if not t.deps]
  heapq.heapify(heap)
  while heap:
    start, ready, i = heapq.heappop(heap)
    task = tasks[i]
    true_start = max(ready, free.get(task.resource, 0.0))
    if true_start > start:
      heapq.heappush(heap, (true_start, ready, i))
      continue
    event = Event(task, start, start + task.duration)
    events[task.name] = event
    free[task.resource] = event.end
    for name in dependents[task.name]:
      ready_at[name] = max(ready_at[name], event.arrival)
      waiting[name] -= 1
      if not waiting[name]:
        heapq.heappush(heap, (ready_at[name], ready_at[name], by_name[name]))
  if len(events) != len(tasks):
    raise ValueError('the task graph has a cycle')
  return events


def makespan(events: dict[str, Event]) -> float:
  return max((e.arrival for e in events.values()), default=0.0)


@dataclasses.dataclass(frozen=True)
class ClientWork:
  """One client's round: what it downloads, computes and uploads."""
  device: DeviceProfile
  forwards: int                 # forward passes over the round (all local steps)
  steps: int = 1                # local steps (only the first overlaps the guidance downlink)
  backwards: int = 0            # backward passes (BP clients)
  upload_bytes: int = 0
  sync_bytes: int = 0           # catch-up download (missed rounds' updates) before computing
  update_flops: float = 0.0     # the local weight updates of all steps (z regenerated, AdamW...)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  stages: tuple                 # workload.Stage, forward order
  batch_size: int
  clients: tuple                # ClientWork
  cloud: DeviceProfile
  edge: DeviceProfile
  guidance_bytes: tuple = ()    # per stage (empty: no guidance this round)
  pool_size: int = 0            # m of the guidance (0: plain directions)
  cloud_flops: float = 0.0      # the cloud's backprop and orthonormalization this round
  cloud_lag: int = 0            # 1: that backprop ran during the previous round
  edge_flops: float = 0.0       # the edge's aggregation (ledger replay)

  def merged(self) -> 'RoundPlan':
    """The sequential schedule's plan: the shared prefix (if any) and the rest as one stage each,
    one message per tier (round_tasks makes the client wait for all of it)."""
    def merge(name, stages, shared):
      return wl.Stage(name, wl.total(stages, 'example_flops'), int(wl.total(stages, 'trainable')),
                      wl.total(stages, 'forward_flops'), shared=shared)
    prefix = [s for s in self.stages if s.shared]
    stages = ((merge('shared prefix', prefix, True),) if prefix else ()) + (
        merge('model', [s for s in self.stages if not s.shared], False),)
    guidance = ((0,) * (len(stages) - 1) + (sum(self.guidance_bytes),)
                if self.guidance_bytes else ())
    return dataclasses.replace(self, stages=stages, guidance_bytes=guidance)


def round_tasks(plan: RoundPlan, pipelined: bool = True) -> list[Task]:
  """The round's task graph (see the module docstring)."""
  if not pipelined:
    plan = plan.merged()
  stages, m = plan.stages, plan.pool_size
  guided = bool(plan.guidance_bytes) and any(plan.guidance_bytes)
  # The cloud's backprop: before this round's guidance, or (lagged, for the next round) after it.
  backprop = [Task('cloud backprop', 'cloud', plan.cloud.seconds(plan.cloud_flops), kind='cloud')
              ] if plan.cloud_flops else []
  tasks = [] if plan.cloud_lag else list(backprop)
  before = tuple(t.name for t in tasks)
  backbone = link(plan.cloud, plan.edge)
  if guided:
    for s, nbytes in zip(stages, plan.guidance_bytes):
      if nbytes:
        code = plan.cloud.seconds(wl.ENCODE_FLOPS * m * s.trainable)
        tasks.append(Task(f'code {s.name}', 'cloud', code, before, kind='cloud'))
        tasks.append(Task(f'backbone {s.name}', 'backbone', backbone.occupancy(nbytes),
                          (f'code {s.name}',), backbone.latency, kind='link'))
  uploads = []
  for c, work in enumerate(plan.clients):
    down = link(plan.edge, work.device, share=len(plan.clients))
    up = link(work.device, plan.edge)
    prefix = f'client {c}'
    previous = ()
    if work.sync_bytes:
      tasks.append(Task(f'{prefix} sync', f'{prefix} downlink', down.occupancy(work.sync_bytes),
                        (), down.latency, kind='link'))
      previous = (f'{prefix} sync',)
    step_flops = wl.step_flops(stages, plan.batch_size, work.forwards / max(work.steps, 1),
                               m if guided else 0)
    downloads = []
    for i, s in enumerate(stages):
      if guided and plan.guidance_bytes[i]:
        tasks.append(Task(f'{prefix} down {s.name}', f'{prefix} downlink',
                          down.occupancy(plan.guidance_bytes[i]), (f'backbone {s.name}',),
                          down.latency, kind='link'))
        downloads.append(f'{prefix} down {s.name}')
    for i, s in enumerate(stages):
      # Pipelined, stage i waits for its own guidance; sequentially, the client waits for all.
      own = f'{prefix} down {s.name}'
      if pipelined:
        waits = (own,) if own in downloads else ()
      else:
        waits = tuple(downloads) if i == 0 else ()
      flops = step_flops[i] + (wl.DECODE_FLOPS * m * s.trainable if guided else 0)
      tasks.append(Task(f'{prefix} {s.name}', f'{prefix} compute', work.device.seconds(flops),
                        previous + waits))
      previous = (f'{prefix} {s.name}',)
    # The rest of the round: the first step's backward, the later steps, the updates.
    rest = (work.steps - 1) * sum(step_flops) + work.update_flops + (
        work.backwards * wl.BACKWARD_FACTOR * plan.batch_size * wl.total(stages, 'example_flops'))
    tasks.append(Task(f'{prefix} rest', f'{prefix} compute', work.device.seconds(rest), previous))
    tasks.append(Task(f'{prefix} upload', f'{prefix} uplink', up.occupancy(work.upload_bytes),
                      (f'{prefix} rest',), up.latency, kind='link'))
    uploads.append(f'{prefix} upload')
  tasks.append(Task('edge aggregate', 'edge', plan.edge.seconds(plan.edge_flops), tuple(uploads),
                    kind='edge'))
  return tasks + (backprop if plan.cloud_lag else [])


def round_seconds(plan: RoundPlan, pipelined: bool = True) -> float:
  """Simulated wall-clock seconds of the round: until the edge has aggregated, or the lagged cloud
  backprop (for the next round) has finished if that is later."""
  return makespan(simulate(round_tasks(plan, pipelined)))


def dtc_formats(plan: RoundPlan, formats=('f32', 'int8', 'int4'), block: int = 256) -> tuple:
  """DTC for the pipeline: per stage, the most precise format whose transfer to every client takes
  no longer than the client computes the stage (or one link latency, below which compressing
  gains nothing), so the pipeline does not wait on the link; the coarsest where none is that fast.
  The default formats are those whose guidance trained as well as f32 (README, DTC section).
  Returns (formats, guidance bytes) per stage."""
  chosen, sizes = [], []
  m = plan.pool_size
  for s in plan.stages:
    if not s.trainable:
      chosen.append(formats[0])
      sizes.append(0)
      continue
    options = [(fmt, wl.stage_guidance_bytes(s, codec_lib.LeafCodec(fmt, block), m))
               for fmt in formats]

    def hidden(nbytes):
      for w in plan.clients:
        down = link(plan.edge, w.device, len(plan.clients))
        compute = w.device.seconds(
            wl.step_flops((s,), plan.batch_size, w.forwards / max(w.steps, 1), m)[0])
        if down.occupancy(nbytes) > max(compute, down.latency):
          return False
      return True

    fmt, nbytes = next((o for o in options if hidden(o[1])), options[-1])
    chosen.append(fmt)
    sizes.append(nbytes)
  return tuple(chosen), tuple(sizes)

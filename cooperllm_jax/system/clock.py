"""The simulated wall clock of a run: each round's latency on the configured devices.

Every round of every algorithm is laid out as an SPC timeline (system/timeline.py) from what the
round really did (the clients that sent, their forward/backward passes, their upload bytes, the
catch-up downloads, the guidance format) and what the model costs (system/workload.py), on the
device profiles named by config.system. metrics.jsonl carries the result as sim_round_s and the
running total sim_time_s, so accuracy can be plotted against simulated time for all algorithms.

Clients get device profiles by config.system.clients: one profile name, or a mix
'phone_midrange:0.7,jetson_orin_nano:0.3' (shares of the clients, assigned by a permutation drawn
from the seed, so a client keeps its device for the whole run).
"""

import dataclasses
from typing import Optional

import numpy as np

from cooperllm_jax.errors import ConfigError
from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.system import profiles as profiles_lib
from cooperllm_jax.system import timeline as tl
from cooperllm_jax.system import workload as wl


def client_devices(spec: str, profiles: dict, num_clients: int, seed: int) -> list:
  """The end-device profile of every client from 'name' or 'name:share,name:share'."""
  parts = [p.strip() for p in str(spec).split(',') if p.strip()]
  if not parts:
    raise ConfigError('system.clients is empty: name one end-device profile or a mix name:share')
  names, shares = [], []
  for part in parts:
    name, sep, share = part.partition(':')
    try:
      value = float(share) if sep else 1.0
    except ValueError:
      raise ConfigError(f'system.clients entry {part!r}: share {share!r} is not a number') from None
    if not value > 0:
      raise ConfigError(f'system.clients entry {part!r}: share must be > 0')
    names.append(profiles_lib.pick(profiles, name.strip(), 'end'))
    shares.append(value)
  counts = np.floor(np.asarray(shares) / sum(shares) * num_clients).astype(int)
  counts[np.argmax(shares)] += num_clients - counts.sum()   # rounding remainder to the largest
  devices = [p for p, n in zip(names, counts) for _ in range(n)]
  order = np.random.default_rng([seed, 0x5EC]).permutation(num_clients)
  return [devices[i] for i in order]


@dataclasses.dataclass
class SimulatedClock:
  stages: tuple
  devices: list                 # per client id
  cloud: profiles_lib.DeviceProfile
  edge: profiles_lib.DeviceProfile
  batch_size: int
  steps: int
  pipelined: bool = True
  pool_size: int = 0            # cooperllm's m (0: no guidance)
  guidance_codec: Optional[codec_lib.LeafCodec] = None
  cloud_examples: int = 0       # public examples the cloud backprops per refresh (0: no cloud)
  cloud_adamw: bool = False     # finetune mode: the cloud takes AdamW steps
  cloud_lag: int = 0
  refresh: int = 1
  bp_clients: bool = False      # fedavg_bp: clients backprop and send dense deltas
  step_passes: int = 2          # forward passes of one local step (central SPSA, one probe: 2)
  elapsed: float = 0.0

  @classmethod
  def for_run(cls, cfg, costs, model, trainable) -> 'SimulatedClock':
    """The clock of a run (config.RunConfig) of an algorithm with `costs` (federated.api.Costs);
    trainable: the tree the clients change (ZO's trainable subset, fedavg_bp's params)."""
    system = cfg.system
    profiles = profiles_lib.load_profiles(system.profiles or None)
    g = costs.guidance
    return cls(
        stages=wl.model_stages(model, trainable, cfg.data.max_length),
        devices=client_devices(system.clients, profiles, cfg.data.num_clients, cfg.seed),
        cloud=profiles_lib.pick(profiles, system.cloud, 'cloud'),
        edge=profiles_lib.pick(profiles, system.edge, 'edge'),
        batch_size=cfg.batch_size, steps=cfg.local_steps, pipelined=bool(system.pipelined),
        pool_size=g.pool_size if g else 0, guidance_codec=g.codec if g else None,
        cloud_examples=g.cloud_examples if g else 0, cloud_adamw=bool(g and g.cloud_adamw),
        cloud_lag=g.cloud_lag if g else 0, refresh=g.refresh if g else 1,
        bp_clients=costs.client_backprop, step_passes=costs.step_passes)

  @property
  def trainable(self) -> int:
    return int(wl.total(self.stages, 'trainable'))

  def guidance_bytes(self, formats: Optional[dict] = None) -> tuple:
    """Per stage; formats: the adaptive allocation's {leaf name: format} of this round."""
    codecs = self.guidance_codec
    if formats:
      codecs = {name: dataclasses.replace(codecs, fmt=fmt) for name, fmt in formats.items()}
    return tuple(wl.stage_guidance_bytes(s, codecs, self.pool_size) for s in self.stages)

  def guidance_budget(self, clients) -> int:
    """DTC from the links (zgr.guidance_format=link): the guidance bytes that every sampled
    client's downlink carries while that client computes its first local step, i.e. what SPC can
    hide behind the compute (at least one link latency's worth)."""
    budgets = []
    for c in clients:
      device = self.devices[int(c)]
      down = profiles_lib.link(self.edge, device, share=len(clients))
      compute = device.seconds(sum(wl.step_flops(self.stages, self.batch_size, self.step_passes,
                                                 self.pool_size)))
      budgets.append(codec_lib.budget_from_link(down.bandwidth, max(compute, down.latency)))
    return min(budgets)

  def cloud_flops(self) -> float:
    """One refresh: backprop over the public batches, the optimizer, orthonormalizing the pool
    (Gram-Schmidt twice: about 8 m^2 d)."""
    d, m = self.trainable, self.pool_size
    passes = (1 + wl.BACKWARD_FACTOR) * self.cloud_examples * wl.total(self.stages, 'example_flops')
    return passes + (wl.ADAMW_FLOPS * d if self.cloud_adamw else 0) + 8 * m * m * d

  def plan(self, round_index: int, clients, forwards, backwards, upload_bytes, sync_bytes,
           sent, probes, arrived, guidance_formats: Optional[dict] = None,
           cloud_ran: Optional[bool] = None) -> tl.RoundPlan:
    """The round as a timeline plan, from arrays over the sampled clients: forward and backward
    passes, upload and catch-up bytes, whether it sent, its ZO probes (each regenerated once more
    for the update) and whether the edge used it (it replays those probes)."""
    d, m = self.trainable, self.pool_size
    per_entry = d * (wl.DIRECTION_FLOPS + 2 + 2 * m)     # regenerate z (and V u), axpy
    works = []
    for c, f, b, up, sync, ok, p in zip(clients, forwards, backwards, upload_bytes, sync_bytes,
                                        sent, probes):
      if not ok:
        continue            # sent nothing: the edge does not wait for it
      if self.bp_clients:
        update = self.steps * wl.ADAMW_FLOPS * d
      else:
        update = int(p) * per_entry
      works.append(tl.ClientWork(self.devices[int(c)], forwards=int(f), steps=self.steps,
                                 backwards=int(b), upload_bytes=int(up), sync_bytes=int(sync),
                                 update_flops=update))
    edge = (2 * d * len(works) if self.bp_clients
            else int(np.sum(np.asarray(probes)[np.asarray(arrived, bool)])) * per_entry)
    guided = self.pool_size > 0
    if cloud_ran is None:   # the refresh schedule, unless the round says whether the cloud ran
      cloud_ran = self.cloud_examples > 0 and (round_index - 1) % self.refresh == 0
    return tl.RoundPlan(
        stages=self.stages, batch_size=self.batch_size, clients=tuple(works), cloud=self.cloud,
        edge=self.edge, guidance_bytes=self.guidance_bytes(guidance_formats) if guided else (),
        pool_size=m, cloud_flops=self.cloud_flops() if cloud_ran else 0.0,
        cloud_lag=self.cloud_lag, edge_flops=edge)

  def tick(self, plan: tl.RoundPlan) -> float:
    """Advances the clock by the plan's round; returns the round's seconds."""
    seconds = tl.round_seconds(plan, self.pipelined)
    self.elapsed += seconds
    return seconds

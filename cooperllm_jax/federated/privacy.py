"""Optional differential privacy of the uplink scalars: per-client clipping and Gaussian noise.

Each honest client clips its round's vector of scalars (one per used step and probe) to L2 norm
`clip` and adds N(0, (noise * clip)^2) to every scalar before sending; the noise comes from a
stream of (seed, round, client), so runs, resumes and replays agree. The edge broadcasts every
client's scalars (the ledger), so each upload is itself a release: per round, a client's upload is
the Gaussian mechanism with L2 sensitivity `clip` (add/remove adjacency: the client's data against
none, whose clipped vector is zero) and noise multiplier `noise`.

Accounting: `epsilon(n)` composes n such releases with the RDP accountant of Google's
dp_accounting (`dp_accounting.rdp.RdpAccountant`) and converts to (epsilon, delta). We do not
claim amplification by subsampling: which clients take part in a round is a public function of
the run's seed, so the privacy of a client is that of the rounds it actually sent in; the run
reports the worst client's epsilon (the most uploads).
"""

import dataclasses
from typing import Optional

import numpy as np

from cooperllm_jax import config as config_lib
from cooperllm_jax.federated.clients import Uplink

_NOISE = 0xD9


@dataclasses.dataclass(frozen=True)
class GaussianPrivacy:
  clip: float
  noise: float
  delta: float = 1e-5
  seed: int = 0

  @classmethod
  def of(cls, dp: config_lib.DP, seed: int) -> Optional['GaussianPrivacy']:
    """The run's DP (config.DP validated its values); None when dp.clip = 0."""
    return cls(dp.clip, dp.noise, dp.delta, seed) if dp.active else None

  def privatize(self, uplink: Uplink, clients, round_index: int) -> Uplink:
    """Every client's scalars clipped to norm `clip` and noised; unused slots (weight 0) stay 0."""
    scalars = np.array(uplink.scalars, np.float32, copy=True)
    used = np.asarray(uplink.weights) > 0
    for i, c in enumerate(clients):
      v = np.where(used[i], scalars[i], 0).astype(np.float64)
      v *= min(1.0, self.clip / max(float(np.linalg.norm(v)), 1e-30))
      rng = np.random.default_rng([self.seed, round_index, int(c), _NOISE])
      noised = v + self.noise * self.clip * rng.standard_normal(v.shape)
      scalars[i] = np.where(used[i], noised, 0).astype(np.float32)
    return uplink._replace(scalars=scalars)

  def epsilon(self, releases: int) -> float:
    """epsilon at `delta` after `releases` uploads of one client (RDP accounting)."""
    import dp_accounting  # pylint: disable=g-import-not-at-top
    from dp_accounting import rdp  # pylint: disable=g-import-not-at-top
    if releases <= 0:
      return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(self.noise), int(releases))
    return float(accountant.get_epsilon(self.delta))

"""Device profiles of the three tiers (cloud, edge, end) and the links between them.

Profiles are data: `profiles.json` next to this file holds the defaults (a mid-range and a flagship
phone, a Jetson-class board, an edge server, a cloud GPU); a user's own JSON file with the same
fields replaces it. A profile's `flops` is the sustained float32 rate of the training workload, not
the chip's peak, so compute time = FLOPs / flops.
"""

import dataclasses
import json
import math
import pathlib
from typing import Mapping, Optional

from cooperllm_jax.errors import ConfigError

DEFAULT_PROFILES = pathlib.Path(__file__).with_name('profiles.json')
TIERS = ('cloud', 'edge', 'end')
_FIELDS = ('tier', 'flops', 'memory_gib', 'uplink_mbps', 'downlink_mbps', 'latency_ms')


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
  name: str
  tier: str
  flops: float          # sustained FLOP/s
  memory_gib: float
  uplink_mbps: float
  downlink_mbps: float
  latency_ms: float     # one-way latency of the device's access link
  description: str = ''

  def __post_init__(self):
    if self.tier not in TIERS:
      raise ConfigError(f'device profile {self.name!r}: tier must be one of {", ".join(TIERS)}, '
                        f'got {self.tier!r}')
    for field in _FIELDS[1:]:
      value = getattr(self, field)
      ok = value >= 0 if field == 'latency_ms' else value > 0
      if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        raise ConfigError(f'device profile {self.name!r}: {field} must be a finite number '
                          f'{">= 0" if field == "latency_ms" else "> 0"}, got {value!r}')

  @property
  def memory_bytes(self) -> int:
    return int(self.memory_gib * 2**30)

  def seconds(self, flops: float) -> float:
    """Compute time of `flops` floating-point operations on this device."""
    return flops / self.flops


@dataclasses.dataclass(frozen=True)
class Link:
  """A one-way link: bytes take bytes / bandwidth on the wire, then latency to arrive."""
  bandwidth: float   # bytes per second
  latency: float     # seconds

  def occupancy(self, nbytes: float) -> float:
    return nbytes / self.bandwidth


def link(sender: DeviceProfile, receiver: DeviceProfile, share: int = 1) -> Link:
  """sender -> receiver at min(sender's uplink / share, receiver's downlink), arriving after both
  access latencies. share: how many receivers the sender serves at once (an equal split)."""
  mbps = min(sender.uplink_mbps / share, receiver.downlink_mbps)
  return Link(bandwidth=mbps * 1e6 / 8, latency=(sender.latency_ms + receiver.latency_ms) / 1e3)


def load_profiles(path: Optional[str] = None) -> dict[str, DeviceProfile]:
  """{name: DeviceProfile} from a JSON file (default: the packaged profiles.json); keys starting
  with '_' are comments."""
  source = pathlib.Path(path) if path else DEFAULT_PROFILES
  try:
    raw = json.loads(source.read_text())
  except OSError as e:
    raise ConfigError(f'cannot read device profiles {str(source)!r}: {e.strerror}') from None
  except json.JSONDecodeError as e:
    raise ConfigError(f'device profiles {str(source)!r} are not valid JSON: {e}') from None
  if not isinstance(raw, Mapping):
    raise ConfigError(f'device profiles {str(source)!r}: expected an object of named profiles')
  out = {}
  for name, fields in raw.items():
    if name.startswith('_'):
      continue
    if not isinstance(fields, Mapping):
      raise ConfigError(f'device profile {name!r} in {str(source)!r} is not an object')
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
      raise ConfigError(f'device profile {name!r} in {str(source)!r} lacks {", ".join(missing)}')
    out[name] = DeviceProfile(name=name, description=str(fields.get('description', '')),
                              **{f: fields[f] for f in _FIELDS})
  return out


def pick(profiles: Mapping[str, DeviceProfile], name: str, tier: str) -> DeviceProfile:
  """profiles[name], checked to be a device of `tier`."""
  if name not in profiles:
    raise ConfigError(f'unknown device profile {name!r}; known: {", ".join(sorted(profiles))}')
  profile = profiles[name]
  if profile.tier != tier:
    raise ConfigError(f'device profile {name!r} is for the {profile.tier} tier, not the {tier} '
                      'tier')
  return profile

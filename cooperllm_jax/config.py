"""Typed run configuration: one `parse(config)` turns an ml_collections ConfigDict (a config file plus
--config.* flags; the packaged default is cooperllm_jax/configs/default.py) into frozen sections,
fills defaults, validates every value once and rejects unknown keys with a one-line ConfigError
(with a close-match suggestion).

Library code receives sections (`ZO`, `ZGR`, `Cloud`, `Warm`, `Aggregation`, `Faults`, `DP`, `Guard`,
`System`, `Mesh`, `Checkpoint`, `Data`, `Model`), never the ConfigDict. The ConfigDict's layout is
the one its users already write: most sections are nested dicts (config.zo.eps), a few fields sit at
the top level for brevity (config.dataset, config.checkpoint_every, config.aggregation); `_FLAT`
says where each of those belongs.
"""

import dataclasses
import difflib
import math
from typing import Any, Optional

from cooperllm_jax.cloud.bp import CloudConfig
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.system import clock as clock_lib
from cooperllm_jax.system import codec as codec_lib
from cooperllm_jax.system import profiles as profiles_lib
from cooperllm_jax.zoo import guided, quantized
from cooperllm_jax.zoo.spsa import Estimator
from cooperllm_jax.zoo.trainable import Subset

DTYPES = ('float32', 'bfloat16', 'float16')
AGGREGATIONS = ('mean', 'clip', 'trimmed_mean', 'median')
GUIDANCE_FORMATS = codec_lib.FORMATS + codec_lib.ALLOCATIONS
CLIENT_BACKENDS = ('map', 'loop')


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _positive(section: str, obj, *names) -> None:
  for name in names:
    value = getattr(obj, name)
    _check(isinstance(value, int) and value >= 1, f'{section}{name} must be >= 1 (an integer), '
           f'got {value!r}')


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Model:
  name: str = 'minilm'          # embedded name, a HF model directory, or a .gguf file
  pooling: str = 'mean'
  dtype: str = 'float32'        # activations
  param_dtype: str = 'float32'  # stored weights
  label_words: tuple = ()       # decoders: one word per class (default: the dataset's label names)
  prompt_suffix: str = '\nTopic:'  # decoders: the cue after which label words are scored

  def __post_init__(self):
    for name in ('dtype', 'param_dtype'):
      _check(getattr(self, name) in DTYPES, f'{name} {getattr(self, name)!r} is not supported; '
             f'choose one of {", ".join(DTYPES)}')


@dataclasses.dataclass(frozen=True)
class Data:
  dataset: str = 'bbcnews'      # embedded name or a local CSV/JSON/Parquet file
  text_column: str = 'text'     # a local file's columns of texts and of labels
  label_column: str = 'label'
  label_names: tuple = ()       # a local file's class names, label id order (() = from the file)
  max_length: int = 32
  num_clients: int = 10
  partition: str = 'dirichlet'
  dirichlet_alpha: float = 0.5
  min_client_size: int = 16
  test_fraction: float = 0.2
  public_fraction: float = 0.05
  validation_fraction: float = 0.0  # held out of the clients' data for tuning (val_accuracy)

  def __post_init__(self):
    _positive('', self, 'max_length', 'num_clients')
    _check(isinstance(self.min_client_size, int) and self.min_client_size >= 0,
           f'min_client_size must be >= 0 (an integer), got {self.min_client_size!r}')
    _check(_finite(self.dirichlet_alpha) and self.dirichlet_alpha > 0,
           f'dirichlet_alpha must be > 0, got {self.dirichlet_alpha}')
    for name in ('test_fraction', 'public_fraction', 'validation_fraction'):
      value = getattr(self, name)
      _check(_finite(value) and 0 <= value < 1, f'{name} must be in [0, 1), got {value}')
    for name in ('text_column', 'label_column'):
      value = getattr(self, name)
      _check(isinstance(value, str) and value != '',
             f'{name} must be a column name (non-empty text), got {value!r}')
    _check(self.text_column != self.label_column,
           f'text_column and label_column are both {self.text_column!r}; name two columns')
    _check(all(isinstance(n, str) and n for n in self.label_names)
           and len(set(self.label_names)) == len(self.label_names),
           f'label_names must be distinct non-empty names, got {list(self.label_names)}')

  @property
  def file_options(self) -> dict:
    """The local-file options (data.load_local) that differ from the defaults: a named dataset
    takes none, so setting one for it is an error (data.load_dataset says which)."""
    default = Data()
    return {name: getattr(self, name) for name in ('text_column', 'label_column', 'label_names')
            if getattr(self, name) != getattr(default, name)}


@dataclasses.dataclass(frozen=True)
class ZO:
  eps: float = 1e-3
  probes: int = 1
  scheme: str = 'central'       # or 'one_sided'
  distribution: str = 'gaussian_hash'  # or 'gaussian' (threefry), 'rademacher[_hash]' (keys.py)
  clip: Optional[float] = None  # |g| bound; None = off
  trainable: str = 'head'       # full | bitfit | head | lora
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple = ('attn/q', 'attn/v')
  perturb_impl: str = 'xla'     # or 'pallas': the fused kernel perturbs 2-D weights
  base_weights: str = 'f32'     # frozen weights kept on the client as 'int8' or 'int4' (packed)
  base_group: int = 32          # columns per quantization scale of the frozen weights
  kseed_candidates: int = 4096  # fedkseed: K
  fwdllm_candidates: int = 4    # fwdllm: directions drawn per probe slot, best cosine kept
  fwdllm_min_probes: int = 1    # fwdllm: probes per step run between min and probes (max)
  fwdllm_var_threshold: float = 0.5

  def __post_init__(self):
    self.estimator, self.subset  # pylint: disable=pointless-statement  # both validate
    _check(self.base_weights in quantized.FORMATS, f'unknown base_weights {self.base_weights!r}; '
           f'choose one of {", ".join(quantized.FORMATS)}')
    _positive('zo.', self, 'base_group', 'kseed_candidates', 'fwdllm_candidates',
              'fwdllm_min_probes')
    _check(_finite(self.fwdllm_var_threshold) and self.fwdllm_var_threshold >= 0,
           f'fwdllm_var_threshold must be >= 0, got {self.fwdllm_var_threshold}')

  @property
  def estimator(self) -> Estimator:
    return Estimator(eps=self.eps, probes=self.probes, scheme=self.scheme,
                     distribution=self.distribution, clip=self.clip,
                     perturb_impl=self.perturb_impl)

  @property
  def subset(self) -> Subset:
    return Subset(self.trainable, self.lora_rank, self.lora_alpha, tuple(self.lora_targets))


@dataclasses.dataclass(frozen=True)
class ZGR:
  """Guided probes z = beta (sqrt(alpha) v + probe_v sqrt(1-alpha) V u), steps along V at the
  first-order rate lr_v (zoo/guided.py: both free of d)."""
  alpha: float = 0.5            # share of the random part; 1 = plain ZO (FedMeZO)
  adaptive: bool = False        # the V step's weight from the edge's estimates
  ema: float = 0.8              # forgetting factor of the adaptive estimates' pooling
  pool_size: int = 1            # m: the last m cloud directions span V
  refresh: int = 1              # the cloud computes a new direction every `refresh` rounds
  beta: float = 1.0             # scale of z's plain part (1 with alpha = 1: plain ZO)
  probe_v: float = guided.DEFAULT_PROBE_V  # the probe's radius along V / the plain part's
  lr_v: float = guided.DEFAULT_LR_V  # first-order rate of the step along V (d-free); the largest
  # one with line_search, which backs off from it as the loss sharpens
  # > 0: the step along V at most curvature_cap / L_V, L_V the public loss's curvature along the
  # cloud's newest direction (the cloud measures it each refresh: one Hessian-vector product)
  curvature_cap: float = 0.0
  # > 0: the plain step's rate at most trace_cap / tr H, tr H the public loss's Hessian trace
  # (Hutchinson, trace_probes Hessian-vector products on the cloud each refresh)
  trace_cap: float = 0.0
  trace_probes: int = 4
  # > 0: the step along V at most the rate the cloud's backtracking line search accepts on the
  # public loss over a round's V displacement (this many halvings of lr_v tried), and the plain
  # step slowed by the same factor the accepted step shrank since the first round; 0 = off
  line_search: int = 12
  guidance_format: str = 'f32'  # V on the downlink: f32 | int8 | int4 | ternary | adaptive | link
  guidance_block: int = 256     # values per codec scale
  guidance_budget_bytes: int = 0  # adaptive: bytes of V per client and round (> 0)
  guidance_topk: Optional[float] = None  # keep this share of V's entries; None = all

  def __post_init__(self):
    _positive('zgr.', self, 'pool_size', 'refresh')
    _check(0.0 <= self.alpha <= 1.0, f'zgr.alpha must be in [0, 1], got {self.alpha}')
    _check(_finite(self.beta) and self.beta > 0, f'zgr.beta must be > 0, got {self.beta}')
    _check(_finite(self.probe_v) and self.probe_v > 0,
           f'zgr.probe_v must be > 0, got {self.probe_v}')
    _check(_finite(self.lr_v) and self.lr_v >= 0, f'zgr.lr_v must be >= 0, got {self.lr_v}')
    _check(0.0 <= self.ema < 1.0, f'zgr.ema must be in [0, 1), got {self.ema}')
    _check(_finite(self.curvature_cap) and self.curvature_cap >= 0,
           f'zgr.curvature_cap must be >= 0, got {self.curvature_cap}')
    _check(_finite(self.trace_cap) and self.trace_cap >= 0,
           f'zgr.trace_cap must be >= 0, got {self.trace_cap}')
    _positive('zgr.', self, 'trace_probes')
    _check(self.line_search >= 0, f'zgr.line_search must be >= 0, got {self.line_search}')
    _check(self.guidance_format in GUIDANCE_FORMATS,
           f'zgr.guidance_format must be one of {", ".join(GUIDANCE_FORMATS)}, got '
           f'{self.guidance_format!r}')
    _check(self.guidance_format != 'adaptive' or self.guidance_budget_bytes > 0,
           'zgr.guidance_format=adaptive needs zgr.guidance_budget_bytes > 0')
    self.codec('f32')  # checks guidance_block and guidance_topk

  def codec(self, fmt: str) -> codec_lib.LeafCodec:
    return codec_lib.LeafCodec(fmt, self.guidance_block, self.guidance_topk)

  @property
  def line_trials(self) -> int:
    """The line search's trials: none without a step along V to search (lr_v = 0)."""
    return self.line_search if self.lr_v > 0 else 0

  @property
  def allocates(self) -> bool:
    """One format per leaf and round under a byte budget ('adaptive' or 'link')."""
    return self.guidance_format in codec_lib.ALLOCATIONS


@dataclasses.dataclass(frozen=True)
class Cloud:
  mode: str = 'gradient'        # or 'finetune': k AdamW steps of the cloud's own, send the update
  learning_rate: float = 1e-3   # finetune: the cloud's AdamW rate (also the direction's unit)
  weight_decay: float = 0.0     # finetune: AdamW's decoupled weight decay
  batches: int = 2              # k public batches per refresh
  batch_size: int = 32
  lag: int = 0                  # 1: round r's guidance from round r-1's model (overlaps the tiers)
  devices: int = 0              # > 0: the cloud runs on the last n devices, clients on device 0
  public_examples: int = 0      # cap on the public slice the cloud uses (0 = all of it)
  public_classes: tuple = ()    # keep only these labels (domain mismatch); () = all
  shuffle_labels: bool = False  # control: permuted public labels (a cloud without signal)
  # The cloud's public set from other datasets ('a+b': names or files, same label ids as the
  # clients'), e.g. another domain of the task; '' = the private dataset's public slice.
  public_dataset: str = ''

  def __post_init__(self):
    self.step  # pylint: disable=pointless-statement  # validates mode and rates
    _positive('cloud.', self, 'batches', 'batch_size')
    _check(self.lag in (0, 1), f'cloud.lag must be 0 or 1, got {self.lag}')
    _check(self.devices >= 0, f'cloud.devices must be >= 0, got {self.devices}')
    _check(self.public_examples >= 0,
           f'cloud.public_examples must be >= 0, got {self.public_examples}')

  @property
  def step(self) -> CloudConfig:
    """What the cloud's BP step needs (cloud/bp.py)."""
    return CloudConfig(self.mode, self.learning_rate, self.weight_decay)


@dataclasses.dataclass(frozen=True)
class Warm:
  """warm_start: the cloud trains alone (cloud_only, at cloud.learning_rate) for the first
  `rounds` rounds, then the scalar protocol `then` (at learning_rate) for the rest.
  `cloud_rounds`: how many of cloud_only's rounds of compute the cloud phase spends, spread evenly
  over its rounds (0: one a round); the run's rounds give it cloud_only's whole model."""
  rounds: int = 10
  then: str = 'fedmezo'
  cloud_rounds: int = 0

  def __post_init__(self):
    _check(isinstance(self.rounds, int) and self.rounds >= 0,
           f'warm.rounds must be >= 0 (an integer), got {self.rounds!r}')
    whole = self.cloud_rounds == 0 or (self.rounds > 0 and self.cloud_rounds % self.rounds == 0)
    _check(isinstance(self.cloud_rounds, int) and self.cloud_rounds >= 0 and whole,
           f'warm.cloud_rounds must be 0 or a multiple of warm.rounds ({self.rounds!r}), got '
           f'{self.cloud_rounds!r}')

  @property
  def cloud_rounds_per_round(self) -> int:
    """cloud_only rounds of AdamW steps in each warm round."""
    return self.cloud_rounds // self.rounds if self.cloud_rounds else 1


@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How the edge combines the round's uplinks (federated/edge.py has the rules' definitions):
  mean (FedAvg) | clip | trimmed_mean | median."""
  rule: str = 'mean'
  trim: float = 0.2             # trimmed_mean: share of the clients cut at each end, in [0, 0.5]
  clip: float = 1.0             # clip: a client's scalar norm is capped at this x the median's

  def __post_init__(self):
    _check(self.rule in AGGREGATIONS,
           f'unknown aggregation {self.rule!r}; choose one of {", ".join(AGGREGATIONS)}')
    _check(0.0 <= self.trim <= 0.5, f'aggregation_trim must be in [0, 0.5], got {self.trim}')
    _check(_finite(self.clip) and self.clip > 0, f'aggregation_clip must be > 0, got {self.clip}')


@dataclasses.dataclass(frozen=True)
class Faults:
  """Simulated faults between the clients and the edge (federated/faults.py)."""
  dropout: float = 0.0          # probability that a sampled client sends nothing this round
  deadline: float = 0.0         # uploads later than this x the nominal latency dropped; 0 = none
  latency_sigma: float = 0.5    # log-normal spread of client speed and of per-round jitter
  byzantine: float = 0.0        # share of the clients (ids fixed by the seed) that corrupt scalars
  byzantine_scale: float = -10.0  # what they multiply their scalars by (-1: sign flip)
  nonfinite: float = 0.0        # probability that a sent scalar arrives as NaN/Inf

  def __post_init__(self):
    for name, upper in (('dropout', 0.99), ('byzantine', 1.0), ('nonfinite', 1.0)):
      value = getattr(self, name)
      _check(0.0 <= value <= upper, f'faults.{name} must be in [0, {upper}], got {value}')
    _check(self.deadline >= 0, f'faults.deadline must be >= 0 (0 = no deadline), got '
           f'{self.deadline}')
    _check(self.latency_sigma >= 0, f'faults.latency_sigma must be >= 0, got '
           f'{self.latency_sigma}')
    _check(_finite(self.byzantine_scale),
           f'faults.byzantine_scale must be finite, got {self.byzantine_scale}')

  @property
  def active(self) -> bool:
    return bool(self.dropout or self.deadline or self.byzantine or self.nonfinite)

  @property
  def corrupts(self) -> bool:
    """Whether any fault alters the scalars (only the scalar protocols can be attacked that way)."""
    return bool(self.byzantine or self.nonfinite)


@dataclasses.dataclass(frozen=True)
class DP:
  """Optional DP of the uplink scalars (federated/privacy.py)."""
  clip: float = 0.0             # L2 bound on a client's scalars per round; 0 = DP off
  noise: float = 1.0            # noise multiplier: N(0, (noise * clip)^2) on every sent scalar
  delta: float = 1e-5           # epsilon is reported at this delta

  def __post_init__(self):
    _check(_finite(self.clip) and self.clip >= 0, f'dp.clip must be > 0 (0 = DP off), got '
           f'{self.clip}')
    if self.clip:
      _check(_finite(self.noise) and self.noise > 0,
             f'dp.noise must be > 0 when dp.clip is set, got {self.noise}')
      _check(0 < self.delta < 1, f'dp.delta must be in (0, 1), got {self.delta}')

  @property
  def active(self) -> bool:
    return bool(self.clip)


@dataclasses.dataclass(frozen=True)
class Guard:
  """Divergence guard (run/guard.py): on a loss spike, roll back and halve the rate."""
  spike: float = 4.0            # train loss > spike x the running median; 0 = off
  window: int = 5               # losses in the running median (the guard starts once it is full)
  max_rollbacks: int = 5        # then give up with an error

  def __post_init__(self):
    _check(self.spike == 0 or self.spike > 1,
           f'guard.spike must be > 1 (or 0 = off), got {self.spike}')
    _positive('guard.', self, 'window')
    _check(self.max_rollbacks >= 0, f'guard.max_rollbacks must be >= 0, got {self.max_rollbacks}')

  @property
  def active(self) -> bool:
    return bool(self.spike)


@dataclasses.dataclass(frozen=True)
class System:
  """The simulated tiers (system/): device profiles and the SPC schedule."""
  profiles: str = ''            # device-profile JSON; '' = cooperllm_jax/system/profiles.json
  cloud: str = 'cloud_gpu'
  edge: str = 'edge_server'
  clients: str = 'phone_midrange'  # one end-device profile, or a mix 'name:share,name:share'
  pipelined: bool = True        # SPC's layer-wise pipelining; False: each tier waits for the last


@dataclasses.dataclass(frozen=True)
class Mesh:
  """The run's device mesh (cooperllm_jax/mesh.py); 1 x 1 x 1 = one device, no mesh."""
  clients: int = 1              # must divide clients_per_round; -1: all devices left
  data: int = 1                 # -1: all devices left
  model: int = 1

  @property
  def sizes(self) -> tuple:
    return (self.clients, self.data, self.model)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  every: int = 10               # orbax checkpoint every N rounds and at the last; 0 = off
  keep: int = 3                 # the newest N are kept
  ledger: bool = True           # workdir/ledger: each round's received uplinks (experiments.replay)

  def __post_init__(self):
    _check(isinstance(self.every, int) and self.every >= 0,
           f'checkpoint_every must be >= 0 (0 = off), got {self.every}')
    _check(isinstance(self.keep, int) and self.keep >= 1,
           f'keep_checkpoints must be >= 1, got {self.keep}')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run: the top-level fields plus one instance of every section."""
  algorithm: str = 'cooperllm'
  seed: int = 0
  rounds: int = 20
  clients_per_round: int = 4
  local_steps: int = 8
  batch_size: int = 8
  learning_rate: float = 1e-2
  weight_decay: float = 0.0     # fedavg_bp's AdamW
  client_chunk: int = 1         # clients vmapped together inside the round's lax.map
  client_backend: str = 'map'   # 'loop': one jitted call per client, for debugging
  eval_every: int = 5
  eval_batch_size: int = 64
  tensorboard: bool = True
  model: Model = Model()
  data: Data = Data()
  zo: ZO = ZO()
  zgr: ZGR = ZGR()
  cloud: Cloud = Cloud()
  warm: Warm = Warm()
  aggregation: Aggregation = Aggregation()
  faults: Faults = Faults()
  dp: DP = DP()
  guard: Guard = Guard()
  system: System = System()
  mesh: Mesh = Mesh()
  checkpoint: Checkpoint = Checkpoint()

  def __post_init__(self):
    _positive('', self, 'rounds', 'clients_per_round', 'local_steps', 'batch_size',
              'client_chunk', 'eval_every', 'eval_batch_size')
    _check(isinstance(self.seed, int) and 0 <= self.seed < 2**31,
           f'seed must be >= 0 (an integer below 2^31), got {self.seed!r}')
    _check(_finite(self.learning_rate) and self.learning_rate > 0,
           f'learning_rate must be finite and > 0, got {self.learning_rate}')
    _check(_finite(self.weight_decay) and self.weight_decay >= 0,
           f'weight_decay must be >= 0, got {self.weight_decay}')
    _check(self.client_backend in CLIENT_BACKENDS,
           f"client_backend must be 'map' or 'loop', got {self.client_backend!r}")
    _check(self.clients_per_round <= self.data.num_clients,
           f'clients_per_round={self.clients_per_round} exceeds '
           f'num_clients={self.data.num_clients}')
    d = self.data
    _check(d.test_fraction + d.public_fraction + d.validation_fraction < 1,
           f'test_fraction + public_fraction + validation_fraction must be < 1, got '
           f'{d.test_fraction} + {d.public_fraction} + {d.validation_fraction}')
    _check(not (self.cloud.public_dataset and d.public_fraction),
           f'cloud.public_dataset={self.cloud.public_dataset!r} replaces the public slice of the '
           f'clients\' dataset: set public_fraction=0 (got {d.public_fraction})')
    profiles = profiles_lib.load_profiles(self.system.profiles or None)
    profiles_lib.pick(profiles, self.system.cloud, 'cloud')
    profiles_lib.pick(profiles, self.system.edge, 'edge')
    clock_lib.client_devices(self.system.clients, profiles, self.data.num_clients, self.seed)


SECTIONS = {'model': Model, 'data': Data, 'zo': ZO, 'zgr': ZGR, 'cloud': Cloud, 'warm': Warm,
            'aggregation': Aggregation, 'faults': Faults, 'dp': DP, 'guard': Guard,
            'system': System, 'mesh': Mesh, 'checkpoint': Checkpoint}
# Top-level ConfigDict keys that belong to a section: key -> (section, field).
_FLAT = {'model': ('model', 'name'), 'pooling': ('model', 'pooling'),
         'dtype': ('model', 'dtype'), 'param_dtype': ('model', 'param_dtype'),
         'label_words': ('model', 'label_words'), 'prompt_suffix': ('model', 'prompt_suffix'),
         **{f.name: ('data', f.name) for f in dataclasses.fields(Data)},
         'aggregation': ('aggregation', 'rule'), 'aggregation_trim': ('aggregation', 'trim'),
         'aggregation_clip': ('aggregation', 'clip'),
         'checkpoint_every': ('checkpoint', 'every'), 'keep_checkpoints': ('checkpoint', 'keep'),
         'ledger': ('checkpoint', 'ledger')}
_NESTED = ('zo', 'zgr', 'cloud', 'warm', 'faults', 'dp', 'guard', 'system', 'mesh')
_TOP = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS)


def _unknown(key: str, known, where: str = '') -> ConfigError:
  close = difflib.get_close_matches(key, list(known), n=1)
  hint = f'; did you mean {where}{close[0]}?' if close else ''
  return ConfigError(f'unknown config field {where}{key}{hint}')


def _plain(value):
  """ConfigDict values as frozen-dataclass fields (lists become tuples)."""
  return tuple(value) if isinstance(value, list) else value


# Fields of earlier versions that config.json files of finished runs still hold: accepted at the
# value they always had (so those runs stay comparable and resumable), an error otherwise.
_RETIRED = {'zgr.': {'alpha_min': (0.05, 'the adaptive mixing no longer moves alpha'),
                     'alpha_max': (0.95, 'the adaptive mixing no longer moves alpha')}}


def _section(cls, values: dict, where: str):
  names = {f.name for f in dataclasses.fields(cls)}
  values = dict(values)
  for key, (old, why) in _RETIRED.get(where, {}).items():
    if key in values:
      value = values.pop(key)
      if value != old:
        raise ConfigError(f'config field {where}{key} was removed ({why}); got {value!r}')
  for key in values:
    if key not in names:
      raise _unknown(key, names, where)
  try:
    return cls(**{k: _plain(v) for k, v in values.items()})
  except TypeError as e:  # a wrongly typed value that a comparison could not take
    raise ConfigError(f'{where or "config"}: {e}') from None


def parse(config: Any) -> RunConfig:
  """The typed, validated run config of a ConfigDict (or a plain dict of the same layout)."""
  if isinstance(config, RunConfig):
    return config
  raw = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  sections = {name: {} for name in SECTIONS}
  top = {}
  for key, value in raw.items():
    if key in _NESTED:
      if not isinstance(value, dict):
        raise ConfigError(f'config field {key} must be a section (a dict), got {value!r}')
      sections[key].update(value)
    elif key in _FLAT:
      section, name = _FLAT[key]
      sections[section][name] = value
    elif key in _TOP:
      top[key] = _plain(value)
    else:
      raise _unknown(key, set(_TOP) | set(_FLAT) | set(_NESTED))
  built = {name: _section(cls, sections[name], f'{name}.' if name in _NESTED else '')
           for name, cls in SECTIONS.items()}
  try:
    return RunConfig(**top, **built)
  except TypeError as e:
    raise ConfigError(f'config: {e}') from None

"""Typed run configuration: one `parse(config)` turns an ml_collections ConfigDict (a config file plus
--config.* flags; the packaged default is cooperllm_jax/configs/default.py) into frozen sections,
fills defaults, validates every value once and rejects unknown keys with a one-line ConfigError
(with a close-match suggestion).

Library code receives sections (`ZO`, `Cloud`, `Aggregation`, `Faults`, `DP`, `Guard`, `System`,
`Mesh`, `Checkpoint`, `Data`, `Model`), never the ConfigDict. The ConfigDict's layout is the one its
users already write: most sections are nested dicts (config.zo.eps), a few fields sit at the top
level for brevity (config.dataset, config.checkpoint_every, config.aggregation); `_FLAT` says where
each of those belongs.

An algorithm owns its section (cooperllm's `zgr`, fwdllm's `fwdllm`): a frozen dataclass in its own
module, registered with it (federated/registry.py calls `add_section`), parsed and validated here
like the shared ones and read as `cfg.<section>`. `algorithm_module` names modules to import before
anything else, so an algorithm in a user's code (and its section) is known to the CLI, the replay
and the benchmark alike: they all parse the same config (or its saved config.json).
"""

import copy
import dataclasses
import difflib
import importlib
import math
from typing import Any, Optional

from cooperllm_jax.cloud.bp import CloudConfig
from cooperllm_jax.errors import ConfigError
from cooperllm_jax.system import clock as clock_lib
from cooperllm_jax.system import profiles as profiles_lib
from cooperllm_jax.zoo import quantized
from cooperllm_jax.zoo.spsa import Estimator
from cooperllm_jax.zoo.trainable import Subset

DTYPES = ('float32', 'bfloat16', 'float16')
AGGREGATIONS = ('mean', 'clip', 'trimmed_mean', 'median')
CLIENT_BACKENDS = ('map', 'loop')


def check(ok: bool, message: str) -> None:
  """A one-line ConfigError with `message` unless `ok` (sections validate with it)."""
  if not ok:
    raise ConfigError(message)


def positive(section: str, obj, *names) -> None:
  """Each field `names` of `obj` is an integer >= 1 (section: the error's prefix, e.g. 'zo.')."""
  for name in names:
    value = getattr(obj, name)
    check(isinstance(value, int) and value >= 1, f'{section}{name} must be >= 1 (an integer), '
          f'got {value!r}')


def finite(value) -> bool:
  """A real number that is neither inf nor nan."""
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
      check(getattr(self, name) in DTYPES, f'{name} {getattr(self, name)!r} is not supported; '
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
    positive('', self, 'max_length', 'num_clients')
    check(isinstance(self.min_client_size, int) and self.min_client_size >= 0,
          f'min_client_size must be >= 0 (an integer), got {self.min_client_size!r}')
    check(finite(self.dirichlet_alpha) and self.dirichlet_alpha > 0,
          f'dirichlet_alpha must be > 0, got {self.dirichlet_alpha}')
    for name in ('test_fraction', 'public_fraction', 'validation_fraction'):
      value = getattr(self, name)
      check(finite(value) and 0 <= value < 1, f'{name} must be in [0, 1), got {value}')
    for name in ('text_column', 'label_column'):
      value = getattr(self, name)
      check(isinstance(value, str) and value != '',
            f'{name} must be a column name (non-empty text), got {value!r}')
    check(self.text_column != self.label_column,
          f'text_column and label_column are both {self.text_column!r}; name two columns')
    check(all(isinstance(n, str) and n for n in self.label_names)
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
  distribution: str = 'rademacher_hash'  # or gaussian (threefry), gaussian_hash, rademacher
  clip: Optional[float] = None  # |g| bound; None = off
  trainable: str = 'head'       # full | bitfit | head | lora
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple = ('attn/q', 'attn/v')
  perturb_impl: str = 'xla'     # or 'pallas': the fused kernel perturbs 2-D weights
  base_weights: str = 'f32'     # frozen weights kept on the client as 'int8' or 'int4' (packed)
  base_group: int = 32          # columns per quantization scale of the frozen weights

  def __post_init__(self):
    self.estimator, self.subset  # pylint: disable=pointless-statement  # both validate
    check(self.base_weights in quantized.FORMATS, f'unknown base_weights {self.base_weights!r}; '
          f'choose one of {", ".join(quantized.FORMATS)}')
    positive('zo.', self, 'base_group')

  @property
  def estimator(self) -> Estimator:
    return Estimator(eps=self.eps, probes=self.probes, scheme=self.scheme,
                     distribution=self.distribution, clip=self.clip,
                     perturb_impl=self.perturb_impl)

  @property
  def subset(self) -> Subset:
    return Subset(self.trainable, self.lora_rank, self.lora_alpha, tuple(self.lora_targets))


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
    positive('cloud.', self, 'batches', 'batch_size')
    check(self.lag in (0, 1), f'cloud.lag must be 0 or 1, got {self.lag}')
    check(self.devices >= 0, f'cloud.devices must be >= 0, got {self.devices}')
    check(self.public_examples >= 0,
          f'cloud.public_examples must be >= 0, got {self.public_examples}')

  @property
  def step(self) -> CloudConfig:
    """What the cloud's BP step needs (cloud/bp.py)."""
    return CloudConfig(self.mode, self.learning_rate, self.weight_decay)


@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How the edge combines the round's uplinks (federated/edge.py has the rules' definitions):
  mean (FedAvg) | clip | trimmed_mean | median."""
  rule: str = 'mean'
  trim: float = 0.2             # trimmed_mean: share of the clients cut at each end, in [0, 0.5]
  clip: float = 1.0             # clip: a client's scalar norm is capped at this x the median's

  def __post_init__(self):
    check(self.rule in AGGREGATIONS,
          f'unknown aggregation {self.rule!r}; choose one of {", ".join(AGGREGATIONS)}')
    check(0.0 <= self.trim <= 0.5, f'aggregation_trim must be in [0, 0.5], got {self.trim}')
    check(finite(self.clip) and self.clip > 0, f'aggregation_clip must be > 0, got {self.clip}')


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
      check(0.0 <= value <= upper, f'faults.{name} must be in [0, {upper}], got {value}')
    check(self.deadline >= 0, f'faults.deadline must be >= 0 (0 = no deadline), got '
          f'{self.deadline}')
    check(self.latency_sigma >= 0, f'faults.latency_sigma must be >= 0, got '
          f'{self.latency_sigma}')
    check(finite(self.byzantine_scale),
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
    check(finite(self.clip) and self.clip >= 0, f'dp.clip must be > 0 (0 = DP off), got '
          f'{self.clip}')
    if self.clip:
      check(finite(self.noise) and self.noise > 0,
            f'dp.noise must be > 0 when dp.clip is set, got {self.noise}')
      check(0 < self.delta < 1, f'dp.delta must be in (0, 1), got {self.delta}')

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
    check(self.spike == 0 or self.spike > 1,
          f'guard.spike must be > 1 (or 0 = off), got {self.spike}')
    positive('guard.', self, 'window')
    check(self.max_rollbacks >= 0, f'guard.max_rollbacks must be >= 0, got {self.max_rollbacks}')

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
    check(isinstance(self.every, int) and self.every >= 0,
          f'checkpoint_every must be >= 0 (0 = off), got {self.every}')
    check(isinstance(self.keep, int) and self.keep >= 1,
          f'keep_checkpoints must be >= 1, got {self.keep}')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run: the top-level fields, one instance of every shared section and, in `sections`,
  of every registered algorithm's own, read like the others (cfg.zgr)."""
  algorithm: str = 'cooperllm'
  # Modules imported before the algorithm is looked up ('pkg.mod' or 'a.b,c.d'): algorithms in a
  # user's code register themselves, and their config sections, when imported.
  algorithm_module: str = ''
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
  cloud: Cloud = Cloud()
  aggregation: Aggregation = Aggregation()
  faults: Faults = Faults()
  dp: DP = DP()
  guard: Guard = Guard()
  system: System = System()
  mesh: Mesh = Mesh()
  checkpoint: Checkpoint = Checkpoint()
  # (name, section) of every registered algorithm section, by name (defaults unless parsed)
  sections: tuple = dataclasses.field(default_factory=lambda: tuple(
      (name, cls()) for name, cls in sorted(_ALGORITHM_SECTIONS.items())))

  def __getattr__(self, name: str):
    """An algorithm's own section by its name: cfg.zgr."""
    section = dict(self.__dict__.get('sections', ())).get(name)
    if section is None:
      raise AttributeError(f'RunConfig has no field or algorithm section {name!r}')
    return section

  def __post_init__(self):
    positive('', self, 'rounds', 'clients_per_round', 'local_steps', 'batch_size',
             'client_chunk', 'eval_every', 'eval_batch_size')
    check(isinstance(self.seed, int) and 0 <= self.seed < 2**31,
          f'seed must be >= 0 (an integer below 2^31), got {self.seed!r}')
    check(finite(self.learning_rate) and self.learning_rate > 0,
          f'learning_rate must be finite and > 0, got {self.learning_rate}')
    check(finite(self.weight_decay) and self.weight_decay >= 0,
          f'weight_decay must be >= 0, got {self.weight_decay}')
    check(self.client_backend in CLIENT_BACKENDS,
          f"client_backend must be 'map' or 'loop', got {self.client_backend!r}")
    check(self.clients_per_round <= self.data.num_clients,
          f'clients_per_round={self.clients_per_round} exceeds '
          f'num_clients={self.data.num_clients}')
    d = self.data
    check(d.test_fraction + d.public_fraction + d.validation_fraction < 1,
          f'test_fraction + public_fraction + validation_fraction must be < 1, got '
          f'{d.test_fraction} + {d.public_fraction} + {d.validation_fraction}')
    check(not (self.cloud.public_dataset and d.public_fraction),
          f'cloud.public_dataset={self.cloud.public_dataset!r} replaces the public slice of the '
          f'clients\' dataset: set public_fraction=0 (got {d.public_fraction})')
    profiles = profiles_lib.load_profiles(self.system.profiles or None)
    profiles_lib.pick(profiles, self.system.cloud, 'cloud')
    profiles_lib.pick(profiles, self.system.edge, 'edge')
    clock_lib.client_devices(self.system.clients, profiles, self.data.num_clients, self.seed)


SECTIONS = {'model': Model, 'data': Data, 'zo': ZO, 'cloud': Cloud, 'aggregation': Aggregation,
            'faults': Faults, 'dp': DP, 'guard': Guard, 'system': System, 'mesh': Mesh,
            'checkpoint': Checkpoint}
# Top-level ConfigDict keys that belong to a section: key -> (section, field).
_FLAT = {'model': ('model', 'name'), 'pooling': ('model', 'pooling'),
         'dtype': ('model', 'dtype'), 'param_dtype': ('model', 'param_dtype'),
         'label_words': ('model', 'label_words'), 'prompt_suffix': ('model', 'prompt_suffix'),
         **{f.name: ('data', f.name) for f in dataclasses.fields(Data)},
         'aggregation': ('aggregation', 'rule'), 'aggregation_trim': ('aggregation', 'trim'),
         'aggregation_clip': ('aggregation', 'clip'),
         'checkpoint_every': ('checkpoint', 'every'), 'keep_checkpoints': ('checkpoint', 'keep'),
         'ledger': ('checkpoint', 'ledger')}
_NESTED = ('zo', 'cloud', 'faults', 'dp', 'guard', 'system', 'mesh')
_TOP = tuple(f.name for f in dataclasses.fields(RunConfig)
             if f.name not in SECTIONS and f.name != 'sections')
# Algorithm sections: name -> frozen dataclass (add_section). A section class may name
#   RENAMED = {'zo.old_key': 'field'}: where an earlier version kept a field (canonical() moves it)
#   RETIRED = {'field': (value, why)}: a removed field, accepted at the value it always had
_ALGORITHM_SECTIONS: dict = {}


def add_section(name: str, cls: type) -> None:
  """Makes `name` a config section parsed into `cls`, a frozen dataclass whose __post_init__
  validates it (registry.register calls this for an algorithm's own section)."""
  taken = set(SECTIONS) | set(_FLAT) | set(_TOP) | {'sections'}
  if name in taken or _ALGORITHM_SECTIONS.get(name, cls) is not cls:
    raise ValueError(f'config section {name!r} is taken')
  if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
    raise TypeError(f'config section {name!r} must be a frozen dataclass, got {cls!r}')
  _ALGORITHM_SECTIONS[name] = cls


def algorithm_sections() -> dict:
  """{name: section class} of every registered algorithm section."""
  return dict(_ALGORITHM_SECTIONS)


def load_modules(names: str) -> None:
  """Imports the modules of `algorithm_module` ('a.b,c.d'; '' = none), registering the
  algorithms and sections they define; one that cannot be imported is a one-line ConfigError."""
  check(isinstance(names, str), f'algorithm_module must be module names, got {names!r}')
  for name in filter(None, (n.strip() for n in names.split(','))):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f'algorithm_module {name!r} cannot be imported ({e}); it must be on the '
                        'Python path (an installed package, or run from its directory)') from None


def canonical(raw: dict) -> dict:
  """A copy of a config as plain data (ConfigDict.to_dict(), or a saved config.json) in today's
  layout: algorithm_module's modules imported, and every field a section's RENAMED lists moved
  from where an earlier version kept it (zo.kseed_candidates -> fedkseed.candidates), so a
  finished run's config.json parses, compares and resumes as the same run."""
  raw = copy.deepcopy(dict(raw))
  load_modules(raw.get('algorithm_module', ''))
  for name, cls in sorted(_ALGORITHM_SECTIONS.items()):
    for old, new in getattr(cls, 'RENAMED', {}).items():
      where, key = old.split('.')
      if isinstance(raw.get(where), dict) and key in raw[where]:
        value = raw[where].pop(key)
        section = raw.setdefault(name, {})
        check(section.get(new, value) == value,
              f'{old}={value!r} and {name}.{new}={section.get(new)!r} disagree: {old} is the '
              f'former name of {name}.{new}; set that one only')
        section[new] = value
  return raw


def _unknown(key: str, known, where: str = '') -> ConfigError:
  close = difflib.get_close_matches(key, list(known), n=1)
  hint = f'; did you mean {where}{close[0]}?' if close else ''
  return ConfigError(f'unknown config field {where}{key}{hint}')


def _plain(value):
  """ConfigDict values as frozen-dataclass fields (lists become tuples)."""
  return tuple(value) if isinstance(value, list) else value


def _section(cls, values: dict, where: str):
  names = {f.name for f in dataclasses.fields(cls)}
  values = dict(values)
  # Fields of earlier versions that config.json files of finished runs still hold: accepted at the
  # value they always had (so those runs stay comparable and resumable), an error otherwise.
  for key, (old, why) in getattr(cls, 'RETIRED', {}).items():
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
  raw = canonical(config.to_dict() if hasattr(config, 'to_dict') else config)
  nested = set(_NESTED) | set(_ALGORITHM_SECTIONS)
  sections = {name: {} for name in (*SECTIONS, *_ALGORITHM_SECTIONS)}
  top = {}
  for key, value in raw.items():
    if key in nested:
      if not isinstance(value, dict):
        raise ConfigError(f'config field {key} must be a section (a dict), got {value!r}')
      sections[key].update(value)
    elif key in _FLAT:
      section, name = _FLAT[key]
      sections[section][name] = value
    elif key in _TOP:
      top[key] = _plain(value)
    else:
      raise _unknown(key, set(_TOP) | set(_FLAT) | nested)
  built = {name: _section(cls, sections[name], f'{name}.' if name in _NESTED else '')
           for name, cls in SECTIONS.items()}
  own = tuple((name, _section(cls, sections[name], f'{name}.'))
              for name, cls in sorted(_ALGORITHM_SECTIONS.items()))
  try:
    return RunConfig(**top, **built, sections=own)
  except TypeError as e:
    raise ConfigError(f'config: {e}') from None

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


def field(default, meaning: str):
  """A config field and its one-line meaning, which `--help` lists (field_meanings): every field
  of a section has one, an algorithm's own section's too."""
  return dataclasses.field(default=default, metadata={'help': meaning})


@dataclasses.dataclass(frozen=True)
class Model:
  """The pretrained model and how it reads a text."""
  name: str = field('minilm', 'an embedded model (minilm, smollm2), a HF model directory or a '
                    '.gguf file')
  pooling: str = field('mean', 'encoders: how token states become one vector: mean | cls | pooler')
  dtype: str = field('float32', 'dtype of the activations: float32 | bfloat16 | float16')
  param_dtype: str = field('float32', 'dtype of the stored weights: float32 | bfloat16 | float16')
  label_words: tuple = field((), "decoders: one word per class (() = the dataset's label names)")
  prompt_suffix: str = field('\nTopic:', 'decoders: the cue after which label words are scored')

  def __post_init__(self):
    for name in ('dtype', 'param_dtype'):
      check(getattr(self, name) in DTYPES, f'{name} {getattr(self, name)!r} is not supported; '
            f'choose one of {", ".join(DTYPES)}')


@dataclasses.dataclass(frozen=True)
class Data:
  """The dataset and its split into test, public, validation and client shards."""
  dataset: str = field('bbcnews', 'a dataset by name (docs/datasets.md) or a local CSV/TSV/JSON/'
                       'JSONL/Parquet file')
  text_column: str = field('text', "a local file's column of texts")
  label_column: str = field('label', "a local file's column of labels")
  label_names: tuple = field((), "a local file's class names in label id order (() = from the "
                             'file)')
  max_length: int = field(32, 'tokens per example (longer texts are cut)')
  num_clients: int = field(10, 'simulated clients that hold the training data')
  partition: str = field('dirichlet', 'how the clients split it: iid | dirichlet (label skew)')
  dirichlet_alpha: float = field(0.5, 'dirichlet: concentration of the labels (smaller: more '
                                 'skew)')
  min_client_size: int = field(16, 'examples every client holds at least (dirichlet redraws)')
  test_fraction: float = field(0.2, 'share of the data held out as the test set')
  public_fraction: float = field(0.05, "share held out as the cloud's public set")
  validation_fraction: float = field(0.0, "share of the clients' data held out for tuning "
                                     '(val_accuracy)')

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
  """The clients' zeroth-order estimator and what it trains."""
  eps: float = field(1e-3, 'perturbation radius of the two-point loss difference')
  probes: int = field(1, 'random directions per local step')
  scheme: str = field('central', 'the loss difference: central | one_sided')
  distribution: str = field('rademacher_hash', 'the directions: gaussian | rademacher (_hash: by '
                            'the counter hash)')
  clip: Optional[float] = field(None, 'bound on each projected-gradient scalar |g|; None = off')
  trainable: str = field('head', 'what every algorithm trains: full | bitfit | head | lora')
  lora_rank: int = field(8, 'lora: rank of the adapters')
  lora_alpha: float = field(16.0, 'lora: the adapters are scaled by lora_alpha / lora_rank')
  lora_targets: tuple = field(('attn/q', 'attn/v'), 'lora: the layer weights adapted, attn/q k v o '
                              'and mlp/up down gate, or their PEFT names (q_proj, ...)')
  perturb_impl: str = field('xla', 'how probes perturb the weights: xla | pallas (a fused kernel '
                            'on 2-D weights)')
  base_weights: str = field('f32', 'frozen weights kept on the client: f32 | int8 | int4 '
                            '(packed)')
  base_group: int = field(32, 'columns per quantization scale of the frozen weights')

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
  """The cloud tier: backpropagation on its public set (cooperllm, cloud_only, warm_start)."""
  mode: str = field('gradient', "gradient | finetune (k AdamW steps of the cloud's own, the "
                    'update sent)')
  learning_rate: float = field(1e-3, "the cloud's AdamW rate (finetune, cloud_only)")
  weight_decay: float = field(0.0, "AdamW's decoupled weight decay (finetune, cloud_only)")
  batches: int = field(2, 'k: public batches per refresh')
  batch_size: int = field(32, 'examples per public batch')
  lag: int = field(0, "1: round r's guidance from round r-1's model (overlaps the tiers)")
  devices: int = field(0, '> 0: the cloud runs on the last n devices, the clients on device 0')
  public_examples: int = field(0, 'cap on the public examples the cloud uses (0 = all)')
  public_classes: tuple = field((), 'keep only these labels of the public set (() = all)')
  shuffle_labels: bool = field(False, 'control: permuted public labels (a cloud without signal)')
  public_dataset: str = field('', "the public set from other datasets ('a+b', the clients' label "
                              "ids; needs public_fraction=0); '' = the public slice")

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
  rule: str = field('mean', "the edge's rule: mean | clip | trimmed_mean | median")
  trim: float = field(0.2, 'trimmed_mean: share of the clients cut at each end, in [0, 0.5]')
  clip: float = field(1.0, "clip: a client's scalar norm is capped at this x the median's")

  def __post_init__(self):
    check(self.rule in AGGREGATIONS,
          f'unknown aggregation {self.rule!r}; choose one of {", ".join(AGGREGATIONS)}')
    check(0.0 <= self.trim <= 0.5, f'aggregation_trim must be in [0, 0.5], got {self.trim}')
    check(finite(self.clip) and self.clip > 0, f'aggregation_clip must be > 0, got {self.clip}')


@dataclasses.dataclass(frozen=True)
class Faults:
  """Simulated faults between the clients and the edge (federated/faults.py)."""
  dropout: float = field(0.0, 'probability that a sampled client sends nothing in a round')
  deadline: float = field(0.0, 'uploads later than this x the nominal latency are dropped; 0 = '
                          'none')
  latency_sigma: float = field(0.5, 'log-normal spread of client speed and of per-round jitter')
  byzantine: float = field(0.0, 'share of the clients (fixed by the seed) that corrupt scalars')
  byzantine_scale: float = field(-10.0, 'what they multiply their scalars by (-1: sign flip)')
  nonfinite: float = field(0.0, 'probability that a sent scalar arrives as NaN/Inf')

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
  clip: float = field(0.0, "L2 bound on a client's scalars per round; 0 = DP off")
  noise: float = field(1.0, 'noise multiplier: N(0, (noise * clip)^2) on every sent scalar')
  delta: float = field(1e-5, 'epsilon is reported at this delta (metrics: dp_epsilon)')

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
  spike: float = field(4.0, 'a spike: train loss > this x the running median; 0 = guard off')
  window: int = field(5, 'losses in the running median (the guard starts once it is full)')
  max_rollbacks: int = field(5, 'rollbacks before the run gives up with an error')

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
  profiles: str = field('', "device-profile JSON; '' = cooperllm_jax/system/profiles.json")
  cloud: str = field('cloud_gpu', "the cloud's device profile")
  edge: str = field('edge_server', "the edge's device profile")
  clients: str = field('phone_midrange', "the clients' device profile, or a mix "
                       "'name:share,name:share'")
  pipelined: bool = field(True, "SPC's layer-wise pipelining; False: each tier waits for the "
                          'last')


@dataclasses.dataclass(frozen=True)
class Mesh:
  """The run's device mesh (cooperllm_jax/mesh.py); 1 x 1 x 1 = one device, no mesh."""
  clients: int = field(1, "devices the sampled clients are split over (divides "
                       'clients_per_round; -1: all left)')
  data: int = field(1, "devices along the cloud's data axis (-1: all left)")
  model: int = field(1, "devices along the cloud's model axis")

  @property
  def sizes(self) -> tuple:
    return (self.clients, self.data, self.model)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What a run keeps to be resumed (--resume) and audited (experiments.replay)."""
  every: int = field(10, 'an orbax checkpoint every N rounds and at the last; 0 = off')
  keep: int = field(3, 'the newest N checkpoints are kept')
  ledger: bool = field(True, "workdir/ledger: each round's received uplinks (experiments.replay)")

  def __post_init__(self):
    check(isinstance(self.every, int) and self.every >= 0,
          f'checkpoint_every must be >= 0 (0 = off), got {self.every}')
    check(isinstance(self.keep, int) and self.keep >= 1,
          f'keep_checkpoints must be >= 1, got {self.keep}')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run: the top-level fields, one instance of every shared section and, in `sections`,
  of every registered algorithm's own, read like the others (cfg.zgr)."""
  algorithm: str = field('cooperllm', 'the federated algorithm, a registered name '
                         '(docs/algorithms.md)')
  # Modules imported before the algorithm is looked up ('pkg.mod' or 'a.b,c.d'): algorithms in a
  # user's code register themselves, and their config sections, when imported.
  algorithm_module: str = field('', "modules imported first ('pkg.mod' or 'a.b,c.d'): a user's "
                                'algorithms and their sections')
  seed: int = field(0, 'seeds the partition, the client samples, the probes and new weights')
  rounds: int = field(20, 'federated rounds')
  clients_per_round: int = field(4, 'clients sampled in each round')
  local_steps: int = field(8, "a sampled client's steps per round")
  batch_size: int = field(8, "examples per client step")
  learning_rate: float = field(1e-2, "the algorithm's rate (ZO-SGD's; AdamW's for fedavg_bp and "
                               'cloud_only)')
  weight_decay: float = field(0.0, "fedavg_bp's AdamW weight decay")
  client_chunk: int = field(1, "clients vmapped together inside the round's lax.map")
  client_backend: str = field('map', 'map | loop (one jitted call per client, for debugging)')
  eval_every: int = field(5, 'test accuracy every N rounds (and after the last)')
  eval_batch_size: int = field(64, 'examples per evaluation batch')
  tensorboard: bool = field(True, 'TensorBoard events in workdir/tb')
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
  """The typed, validated run config of a ConfigDict (or a plain dict of the same layout).

  Args:
    config: a ConfigDict, a plain dict of the same layout (sections as nested dicts, or their
      flat field names), or a RunConfig (returned as it is).

  Returns:
    The RunConfig, each section (the shared ones and the registered algorithms' own) a frozen
    dataclass that validated itself; an unknown or wrongly typed field raises ConfigError.
  """
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


def _layout():
  """(key as --config.<key> names it, section name or None, dataclass field) of every config
  field: the top-level ones and the shared sections' in RunConfig's order, then each registered
  algorithm section's."""
  flat = {where: key for key, where in _FLAT.items()}
  for f in dataclasses.fields(RunConfig):
    if f.name in SECTIONS:
      for g in dataclasses.fields(SECTIONS[f.name]):
        yield flat.get((f.name, g.name), f'{f.name}.{g.name}'), f.name, g
    elif f.name in _TOP:
      yield f.name, None, f
  for name, cls in sorted(_ALGORITHM_SECTIONS.items()):
    for g in dataclasses.fields(cls):
      yield f'{name}.{g.name}', name, g


def field_meanings() -> dict:
  """{key: the field's one-line meaning (`field`'s; '' where a section gives none)} of every
  config field, keyed as --config.<key> names it."""
  return {key: f.metadata.get('help', '') for key, _, f in _layout()}


def flatten(cfg: RunConfig) -> dict:
  """{key: value} of every field of a typed config, keyed as --config.<key> names it."""
  return {key: getattr(getattr(cfg, section) if section else cfg, f.name)
          for key, section, f in _layout()}

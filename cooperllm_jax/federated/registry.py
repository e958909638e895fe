"""Algorithms by name: `@register('name', config=Section)` on a class with the api.Algorithm
protocol and a `from_config(cfg, model, public)` classmethod; `make_algorithm` builds one from a run
config. The registry is the only place that maps names to algorithms. A module outside the package
registers the same way: the run config's `algorithm_module` imports it (config.load_modules)."""

from typing import Any, Callable, Optional

from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import ConfigError

_REGISTRY: dict = {}


def register(name: str, config: Optional[type] = None,
             section: Optional[str] = None) -> Callable[[type], type]:
  """Class decorator: `make_algorithm` builds this class for a config whose algorithm is `name`.

  Args:
    name: the algorithm's name (config.algorithm).
    config: its own config section, a frozen dataclass that validates itself in __post_init__;
      parse() fills it from the config's `section` dict and from_config reads it as
      `cfg.<section>`. None: the algorithm reads only the shared sections.
    section: the section's name in the config; defaults to `name`.

  Returns:
    The decorator, which sets the class's `name` and `config` and returns it.
  """
  def add(cls: type) -> type:
    if name in _REGISTRY:
      raise ValueError(f'algorithm {name!r} is registered twice')
    if config is not None:
      config_lib.add_section(section or name, config)
    cls.name, cls.config = name, config
    _REGISTRY[name] = cls
    return cls

  return add


def names() -> tuple:
  return tuple(_REGISTRY)


def lookup(name: str) -> type:
  """The class registered as `name`; a one-line ConfigError naming the choices otherwise."""
  if name not in _REGISTRY:
    raise ConfigError(f'unknown algorithm {name!r}; choose one of {", ".join(_REGISTRY)} (or '
                      'name the module that registers it in algorithm_module)')
  return _REGISTRY[name]


def make_algorithm(config: Any, model: Any, public: Optional[dict] = None) -> Any:
  """The algorithm named by the config (a ConfigDict or config.RunConfig), built for `model`.

  Args:
    config: the run config, a ConfigDict (parsed here) or a config.RunConfig.
    model: the loaded model (models.Pretrained).
    public: the cloud's tokenized public examples (client_data.public_set), for algorithms
      whose `needs_public` is set; None otherwise.

  Returns:
    The registered class's from_config(cfg, model, public): an object with the Algorithm
    protocol.
  """
  cfg = config_lib.parse(config)
  return lookup(cfg.algorithm).from_config(cfg, model, public)

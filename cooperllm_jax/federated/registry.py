"""Algorithms by name: `@register('name')` on a class with the api.Algorithm protocol and a
`from_config(cfg, model, public)` classmethod; `make_algorithm` builds one from a run config. The
registry is the only place that maps names to algorithms."""

from typing import Any, Callable, Optional

from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import ConfigError

_REGISTRY: dict = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: `make_algorithm` builds this class for a config whose algorithm is `name`."""
  def add(cls: type) -> type:
    if name in _REGISTRY:
      raise ValueError(f'algorithm {name!r} is registered twice')
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return add


def names() -> tuple:
  return tuple(_REGISTRY)


def lookup(name: str) -> type:
  """The class registered as `name`; a one-line ConfigError naming the choices otherwise."""
  if name not in _REGISTRY:
    raise ConfigError(f'unknown algorithm {name!r}; choose one of {", ".join(_REGISTRY)}')
  return _REGISTRY[name]


def make_algorithm(config: Any, model: Any, public: Optional[dict] = None) -> Any:
  """The algorithm named by the config (a ConfigDict or config.RunConfig), built for `model`.
  public: the cloud's tokenized public examples (client_data.public_set), for algorithms whose
  `needs_public` is set."""
  cfg = config_lib.parse(config)
  return lookup(cfg.algorithm).from_config(cfg, model, public)

"""The run's device mesh ('clients', 'data', 'model'), shared by the cloud and the clients.

Clients are data (DESIGN.md, principle 4). A round's batches [C, S, B, ...] and client ids [C] are
split over the mesh's 'clients' axis and each device trains its C / n clients (`over_clients`, a
shard_map); the global trainable weights, the frozen ones, the round's guidance and index are
replicated. What leaves a device is what leaves a real client: its uplink scalars (and losses),
gathered so the edge's replay runs replicated on every device. No weights cross devices.

The cloud's shardings (cloud/sharding.py) name only 'data' and 'model', the clients' only
'clients'. Inside `over_clients` every mesh axis is manual, so with data x model > 1 each
(data, model) position trains the same clients (redundant but correct: the client tier is meant
to scale over 'clients'). Arrays made here are global
jax.Arrays (replicated, or split over 'clients'), valid across processes and savable by orbax.
"""

import math
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cooperllm_jax import config as config_lib
from cooperllm_jax.errors import ConfigError

# The clients' code (models, lax loops carrying the weights) is not written with shard_map's
# varying-axis types, and the outputs are declared split over 'clients' (no replication claimed),
# so the check is off.
try:  # jax >= 0.7 exports it at the top level; earlier versions only under experimental.
  from jax import shard_map
  _UNCHECKED = {'check_vma': False}
except ImportError:  # pragma: no cover - depends on the installed jax
  from jax.experimental.shard_map import shard_map
  _UNCHECKED = {'check_rep': False}

CLIENT_AXIS = 'clients'
MESH_AXES = (CLIENT_AXIS, 'data', 'model')
CLIENT_SPEC = PartitionSpec(CLIENT_AXIS)


def make_mesh(data: int = -1, model: int = 1, devices: Optional[Sequence] = None,
              clients: int = 1) -> Mesh:
  """A ('clients', 'data', 'model') mesh with Auto axes over the first clients * data * model
  devices; one of data and clients may be -1: all the devices the other axes leave.

  'clients' is the outermost axis, so with jax.devices()' order (process by process) it is the one
  that spans hosts: the cloud's FSDP/tensor-parallel collectives over 'data'/'model' stay within a
  host while only the clients' scalars travel between hosts."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [clients, data, model]
  shape = ' x '.join(map(str, sizes))
  if model < 1 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ConfigError(f'mesh clients x data x model = {shape}: sizes must be >= 1 (data or '
                      'clients may be -1, not both)')
  fixed = math.prod(s for s in sizes if s != -1)
  if n % fixed:
    raise ConfigError(f'mesh clients x data x model = {shape} does not divide the {n} devices')
  sizes = [n // fixed if s == -1 else s for s in sizes]
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:math.prod(sizes)])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (client) dimension split over 'clients', the rest replicated."""
  return NamedSharding(mesh, CLIENT_SPEC)


def check_clients(num_clients: int, mesh: Mesh) -> None:
  n = mesh.shape[CLIENT_AXIS]
  if num_clients % n:
    raise ConfigError(f'{num_clients} clients per round do not split evenly over the mesh\'s '
                      f'clients axis of {n} devices (mesh.clients): use a multiple of {n}')


def over_clients(f: Callable, mesh: Mesh) -> Callable:
  """f(batches, clients, *replicated) -> a pytree with a leading client dimension, run as a
  shard_map in which each device calls f on its share of the clients; the outputs come back
  gathered (replicated over the mesh), so they are all that crosses devices."""

  def run(batches, clients, *rest):
    check_clients(clients.shape[0], mesh)
    in_specs = (CLIENT_SPEC, CLIENT_SPEC) + (PartitionSpec(),) * len(rest)
    local = shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=CLIENT_SPEC, **_UNCHECKED)
    return jax.lax.with_sharding_constraint(local(batches, clients, *rest), replicated(mesh))

  return run


def _on_mesh(x, mesh: Mesh) -> bool:
  return isinstance(getattr(x, 'sharding', None), NamedSharding) and x.sharding.mesh == mesh


def replicate(tree, mesh: Mesh):
  """Every leaf replicated on the mesh, except leaves already placed on it (e.g. the cloud's
  FSDP-sharded state), which keep their sharding. Host values must agree across processes."""
  return jax.tree.map(lambda x: x if _on_mesh(x, mesh) else jax.device_put(x, replicated(mesh)),
                      tree)


def place_round(mesh: Mesh, batches, counts, clients, round_index):
  """A round's inputs as global arrays: batches split over 'clients' (global arrays already on the
  mesh, e.g. from host_local_batches, are kept), the rest replicated."""
  check_clients(len(clients), mesh)
  batches = jax.tree.map(lambda x: x if _on_mesh(x, mesh)
                         else jax.device_put(x, client_sharding(mesh)), batches)
  return (batches,) + tuple(jax.device_put((counts, clients, round_index), replicated(mesh)))


def host_local_batches(mesh: Optional[Mesh], sampled: np.ndarray, load: Callable):
  """(batches {name: [C, ...]} split over 'clients', counts [C] replicated) as global arrays, of
  which each process materializes only the clients on its own devices (mesh None: load(sampled)).

  load(ids) -> ({name: [len(ids), ...]}, counts [len(ids)]) for a contiguous part of the round's
  client ids `sampled` (client_data.round_batches with everything else bound); it is called once
  per distinct part this process holds, through jax.make_array_from_callback.
  """
  if mesh is None:
    return load(sampled)
  num = len(sampled)
  check_clients(num, mesh)
  sharding = client_sharding(mesh)
  parts = {}

  def part(index):
    span = index[0].indices(num)
    if span not in parts:
      parts[span] = load(np.asarray(sampled)[slice(*span)])
    return parts[span]

  first = next(iter(sharding.addressable_devices_indices_map((num,)).values()))
  batches, counts = part(first)

  def global_array(pick, local):
    return jax.make_array_from_callback((num,) + local.shape[1:], sharding,
                                        lambda index: pick(part(index)))

  # The counts (one float per client) are gathered: the edge and host-side code read them all.
  return ({name: global_array(lambda p, name=name: p[0][name], x) for name, x in batches.items()},
          jax.device_put(global_array(lambda p: p[1], counts), replicated(mesh)))


def for_run(spec: config_lib.Mesh, clients_per_round: int) -> Optional[Mesh]:
  """The run's mesh from config.Mesh (clients, data, model), None for 1 x 1 x 1 on one process
  (the single-device path). A multi-process run must span every device, and the clients axis
  must divide clients_per_round (checked here, before anything is written)."""
  if spec.sizes == (1, 1, 1) and jax.process_count() == 1:
    return None
  mesh = make_mesh(data=spec.data, model=spec.model, clients=spec.clients)
  if mesh.size != jax.device_count() and jax.process_count() > 1:
    raise ConfigError(f'a run over {jax.process_count()} processes needs a mesh over all '
                      f'{jax.device_count()} devices, got clients x data x model = '
                      f'{" x ".join(map(str, mesh.devices.shape))} (e.g. --config.mesh.clients=-1)')
  check_clients(clients_per_round, mesh)
  return mesh

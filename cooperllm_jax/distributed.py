"""Multi-process start-up: `jax.distributed.initialize` from explicit settings or the launcher's
environment, before anything touches a JAX backend.

Explicit: coordinator address, process count and process id (experiments/train.py's
--coordinator_address, --num_processes, --process_id), all three or none.
Otherwise the environment decides; `cluster()` names the launcher it recognizes, and then
jax.distributed.initialize() is called without arguments so JAX reads the same variables:

  slurm     srun with more than one task: SLURM_NTASKS > 1 and SLURM_JOB_ID,
            SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID all set. JAX gives each task the one
            local GPU numbered SLURM_LOCALID, so launch one task per GPU.
  openmpi   mpirun with more than one rank: OMPI_COMM_WORLD_SIZE > 1 and OMPI_MCA_orte_hnp_uri.
  tpu       a multi-host Cloud TPU slice on GKE: TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES)
            lists more than one host.
  opt-in    COOPERLLM_DISTRIBUTED=1: trust JAX's own detection (e.g. a Cloud TPU VM slice, found
            through the GCE metadata server, which no environment variable shows).
No flags and none of these: a single process, and nothing is initialized.
"""

import os
from typing import Mapping, Optional

import jax

from cooperllm_jax.errors import ConfigError

_SLURM = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')


def _count(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, '1'))
  except ValueError:
    return 1


def cluster(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """The multi-process launcher this process runs under (see the module docstring), or None."""
  if _count(environ, 'SLURM_NTASKS') > 1 and all(k in environ for k in _SLURM):
    return 'slurm'
  if _count(environ, 'OMPI_COMM_WORLD_SIZE') > 1 and 'OMPI_MCA_orte_hnp_uri' in environ:
    return 'openmpi'
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES') or ''
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'tpu'
  if environ.get('COOPERLLM_DISTRIBUTED') == '1':
    return 'opt-in'
  return None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """Starts jax.distributed when the run spans processes; returns how ('flags' or cluster()'s
  name), or None for a single process."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError('--coordinator_address, --num_processes and --process_id go together '
                        '(or give none and let the launcher\'s environment decide)')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} must be in [0, --num_processes='
                        f'{num_processes})')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return 'flags'
  how = cluster(environ)
  if how is not None:
    jax.distributed.initialize()
  return how

"""The cloud tier: backprop on public data (sharded over a device mesh) that yields the guidance
directions for the clients' zeroth-order estimates."""

from cooperllm_jax.cloud.bp import MODES, CloudConfig, CloudStep, make_cloud_step
from cooperllm_jax.cloud.sharding import (CLIENT_AXIS, LOGICAL_RULES, MESH_AXES, batch_sharding,
                                          logical_spec, lora_axes, make_mesh, spec_shardings,
                                          trainable_shardings, tree_shardings)

__all__ = ['MODES', 'CloudConfig', 'CloudStep', 'make_cloud_step', 'CLIENT_AXIS', 'LOGICAL_RULES',
           'MESH_AXES', 'batch_sharding', 'logical_spec', 'lora_axes', 'make_mesh', 'spec_shardings',
           'trainable_shardings', 'tree_shardings']

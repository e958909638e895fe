"""The cloud tier: backprop on public data (sharded over a device mesh) that yields the guidance
directions for the clients' zeroth-order estimates."""

from cooperllm_jax.cloud.bp import MODES, CloudConfig, CloudStep, make_cloud_step
from cooperllm_jax.cloud.sharding import (LOGICAL_RULES, batch_sharding, logical_spec, lora_axes,
                                          spec_shardings, trainable_shardings, tree_shardings)

__all__ = ['MODES', 'CloudConfig', 'CloudStep', 'make_cloud_step', 'LOGICAL_RULES',
           'batch_sharding', 'logical_spec', 'lora_axes', 'spec_shardings',
           'trainable_shardings', 'tree_shardings']

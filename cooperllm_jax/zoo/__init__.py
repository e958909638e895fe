"""Zeroth-order optimization: key schedule, SPSA estimators, trainable subsets, layer-wise hooks."""

from cooperllm_jax.zoo.keys import (address_key, address_keys, leaf_direction, root_key,
                                    slice_direction, tree_direction)
from cooperllm_jax.zoo.perturb import (Perturbation, apply_direction, apply_directions,
                                       coefficients, master, replay)
from cooperllm_jax.zoo.spsa import (Estimator, loss_at, make_estimate, make_projected_gradient,
                                    make_zo_step)
from cooperllm_jax.zoo.trainable import Subset, overlay, trainable_paths

__all__ = ['address_key', 'address_keys', 'leaf_direction', 'root_key', 'slice_direction',
           'tree_direction', 'Perturbation', 'apply_direction', 'apply_directions', 'coefficients',
           'master', 'replay', 'Estimator', 'loss_at', 'make_estimate', 'make_projected_gradient',
           'make_zo_step', 'Subset', 'overlay', 'trainable_paths']

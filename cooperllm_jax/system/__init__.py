"""System layer: the DTC codec and bit allocation of the guidance downlink (codec), device profiles
of the tiers (profiles), per-stage FLOPs and bytes (workload), the SPC round timeline (timeline) and
the simulated wall clock of a run (clock)."""

from cooperllm_jax.system.codec import (FORMATS, Allocation, Encoded, LeafChoice, LeafCodec,
                                        allocate, budget_from_link, decode_tree, encode_tree,
                                        encoded_bytes, roundtrip_tree, tree_nbytes)

__all__ = ['FORMATS', 'Allocation', 'Encoded', 'LeafChoice', 'LeafCodec', 'allocate',
           'budget_from_link', 'decode_tree', 'encode_tree', 'encoded_bytes', 'roundtrip_tree',
           'tree_nbytes']

"""System layer: the DTC codec and bit allocation of the guidance downlink."""

from cooperllm_jax.system.codec import (FORMATS, Allocation, Encoded, LeafChoice, LeafCodec,
                                        allocate, budget_from_link, decode_tree, encode_tree,
                                        encoded_bytes, roundtrip_tree, tree_nbytes)

__all__ = ['FORMATS', 'Allocation', 'Encoded', 'LeafChoice', 'LeafCodec', 'allocate',
           'budget_from_link', 'decode_tree', 'encode_tree', 'encoded_bytes', 'roundtrip_tree',
           'tree_nbytes']

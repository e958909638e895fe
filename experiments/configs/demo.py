"""The checkout's name for the packaged default run (cooperllm_jax/configs/default.py): `make demo`,
the flags files and the reproductions name it as --config=experiments/configs/demo.py[:algorithm]."""

from cooperllm_jax.configs.default import LEARNING_RATES, get_config

__all__ = ['LEARNING_RATES', 'get_config']

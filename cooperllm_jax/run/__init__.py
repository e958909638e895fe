"""The run loop (loop.py) with its hooks, state, task and divergence guard."""

from cooperllm_jax.run.loop import train_and_evaluate

__all__ = ['train_and_evaluate']

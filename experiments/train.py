"""`python -m experiments.train` in a checkout: the `cooperllm-train` console script
(cooperllm_jax/train.py has the flags and what a run writes)."""

from cooperllm_jax import train

if __name__ == '__main__':
  train.main()

"""`python -m experiments.compare` in a checkout: the `cooperllm-compare` console script
(cooperllm_jax/compare.py has the flags and what it writes)."""

from cooperllm_jax import compare

if __name__ == '__main__':
  compare.main()

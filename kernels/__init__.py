"""Pallas kernels. Each kernel file holds the kernel, a pure-jnp reference of the same function, and
is tested against it in interpret mode on CPU (compiled on GPU when one is present)."""

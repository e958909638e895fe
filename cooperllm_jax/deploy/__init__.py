"""The tiers as processes on Flower's deployment engine (the optional `[flower]` extra).

apps.py: the ServerApp (the edge: the run loop of cooperllm_jax/run/loop.py, with the cloud in
its process) and the ClientApp (an end device: its own partition, batches and frozen base model);
wire.py: pytrees as raw bytes on Flower's wire; local.py: a federation on loopback in one command.
docs/deployment.md says how to run the same apps on real machines.
"""

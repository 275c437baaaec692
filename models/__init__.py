"""Flax NNX models. Variables carry logical axis names as metadata only: sharding is decided by
parallel/rules.py at the jit boundary, never eagerly at variable creation."""

import flax

flax.config.update("flax_always_shard_variable", False)

"""Shapes of one global batch, with no data read: what `Stage.abstract_batch` returns.

scripts/compile_check.py compiles a stage's train step for a TPU pod from these shapes alone,
so each stage states the arrays its `make_dataset` yields (training/stage.py). Every supervised
stage reads packed rows `[global_batch_size, seq_len]` (data/packing.py): the five fields of
`PACKED_FIELDS`, plus the per-token fields of its own records (the preference stages'
`sides`, `example_ids`, ...). A leaf module, so that every stage can import it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

# The fields of every packed row (data/packing.py) and their dtypes.
PACKED_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
                 "segment_ids": jnp.int32, "positions": jnp.int32}


def shapes(rows: int, fields: dict[str, tuple[tuple[int, ...], Any]]
           ) -> dict[str, jax.ShapeDtypeStruct]:
  """{name: ShapeDtypeStruct((rows, *trailing), dtype)} of `fields`: name -> (trailing, dtype)."""
  return {name: jax.ShapeDtypeStruct((rows,) + tuple(trailing), dtype)
          for name, (trailing, dtype) in fields.items()}


def packed_rows(config: ml_collections.ConfigDict, **extra: Any
                ) -> dict[str, jax.ShapeDtypeStruct]:
  """`[global_batch_size, seq_len]` packed rows: PACKED_FIELDS and `extra` (name=dtype)."""
  length = config.data.seq_len
  return shapes(config.data.global_batch_size,
                {name: ((length,), dtype) for name, dtype in {**PACKED_FIELDS, **extra}.items()})

"""Stage adapters: which forward passes a stage needs, and which objective scores them.

Each adapter is `loss_fn(model, batch, rng, objective_config) -> (per_token_or_example, metrics)`
where metrics are `(sum, weight)` pairs and `metrics["loss"]` is what the step optimises. The
objectives themselves (objectives/) never see a model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from objectives.clm import clm_loss
from objectives.reductions import Metrics

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array, ml_collections.ConfigDict],
                  tuple[jax.Array, Metrics]]


def clm_forward(model: nnx.Module, batch: Batch, rng: jax.Array,
                cfg: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
  """Causal LM on a packed batch {inputs, targets, loss_mask, segment_ids, positions}."""
  del rng
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return clm_loss(logits, batch["targets"], batch["loss_mask"], z_loss=cfg.z_loss)


STAGE_LOSSES: dict[str, LossFn] = {"clm": clm_forward}


def get_loss_fn(name: str) -> LossFn:
  if name not in STAGE_LOSSES:
    raise ValueError(f"config.objective.name: unknown {name!r}; choose one of "
                     f"{sorted(STAGE_LOSSES)}")
  return STAGE_LOSSES[name]


def model_kind(objective: str) -> str:
  return {"clm": "decoder"}.get(objective, "decoder")


def batch_tokens(batch: dict[str, Any]) -> int:
  """Real (non-padding) tokens in a batch, for throughput."""
  return int((batch["segment_ids"] > 0).sum())

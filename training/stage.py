"""Stages: which data, which forward passes and which objective make up one pipeline stage.

A `Stage` bundles:
  loss_fn(model, batch, rng, objective_config, frozen) -> (per-token or per-example values,
      metrics as (sum, weight) pairs with metrics["loss"] the optimised sum). `frozen` maps names
      to frozen models (a DPO reference, a distillation teacher) bound from their own params.
  make_dataset(config, tokenizer, *, split, batch_size, shard_index, shard_count, seed,
      num_epochs, workdir) -> a grain dataset of packed batches for this host.
  frozen_models(config) -> {name: FrozenModel} to load once from a checkpoint, never train.
  evaluate(context) -> extra held-out metrics at eval steps (e.g. greedy-generation accuracy).
  prepare(config, tokenizer, *, mesh, rules, workdir) -> None: one-off work before any data is
      read (e.g. DPO's pass of the reference model over the data, cached in the workdir).
  train(config, workdir) -> final metrics: a loop of its own instead of training/loop.py's
      (the RL stages of training/rl: sample, score, update).
The objectives themselves (objectives/) never see a model: the stage's loss_fn is the small
adapter that runs the forward passes and hands arrays to the objective.

Stage modules register themselves in STAGES below, keyed by `config.objective.name`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import ml_collections
from flax import nnx

from objectives.reductions import Metrics

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array, ml_collections.ConfigDict,
                   Mapping[str, nnx.Module]], tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """A model the stage uses but does not train (DPO / PPO reference, distillation teacher)."""
  model_config: ml_collections.ConfigDict
  path: str              # workdir, checkpoints dir or step dir of the run that trained it
  kind: str = "decoder"  # models/build.py MODEL_CLASSES key


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  loss_fn: LossFn
  make_dataset: Callable[..., Any]
  model_kind: str = "decoder"
  frozen_models: Callable[[ml_collections.ConfigDict], dict[str, FrozenModel]] = (
      lambda config: {})
  evaluate: Callable[..., dict[str, float]] | None = None
  prepare: Callable[..., None] | None = None
  # A loop of its own, `train(config, workdir) -> final metrics`, run by scripts/train.py
  # instead of training/loop.py's (the RL stages: sample, score, update; training/rl).
  train: Callable[..., dict[str, float]] | None = None


def _registry() -> dict[str, Stage]:
  from training.stages import clm
  from training.stages import distill
  from training.stages import dpo
  from training.stages import mlm
  from training.stages import reward
  from training.stages import sft
  from training.rl import stages as rl_stages
  return {stage.name: stage for stage in (clm.STAGE, mlm.STAGE, distill.STAGE, sft.STAGE,
                                          reward.STAGE, dpo.STAGE, *rl_stages.make_stages())}


def get_stage(name: str) -> Stage:
  stages = _registry()
  if name not in stages:
    raise ValueError(f"config.objective.name: unknown {name!r}; choose one of {sorted(stages)}")
  return stages[name]


def get_loss_fn(name: str) -> LossFn:
  return get_stage(name).loss_fn


def batch_tokens(batch: Mapping[str, Any]) -> int:
  """Real (non-padding) tokens in a batch, for throughput."""
  return int((batch["segment_ids"] > 0).sum())

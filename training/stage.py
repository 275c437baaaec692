"""The stage interface: which data, which forward passes and which objective make one stage.

A `Stage` bundles:
  loss_fn(model, batch, rng, objective_config, frozen) -> (per-token or per-example values,
      metrics as (sum, weight) pairs with metrics["loss"] the optimised sum). `frozen` maps names
      to frozen models (a DPO reference, a distillation teacher) bound from their own params.
  make_dataset(config, tokenizer, *, split, batch_size, shard_index, shard_count, seed,
      num_epochs, workdir) -> a grain dataset of packed batches for this host.
  frozen_models(config) -> {name: FrozenModel} to load once from a checkpoint, never train.
  make_evaluator(EvalContext) -> an evaluator, built once per run: `evaluator(params)` returns
      extra held-out metrics at eval steps (e.g. greedy-generation accuracy). It owns whatever
      it compiles or reads once (jitted functions, held-out prompts, a run's init params).
  prepare(config, tokenizer, *, mesh, rules, workdir) -> None: one-off work before any data is
      read (e.g. DPO's pass of the reference model over the data, cached in the workdir).
  train(config, workdir) -> final metrics: a loop of its own instead of training/loop.py's
      (the RL stages of training/rl: sample, score, update).
The objectives themselves (objectives/) never see a model: the stage's loss_fn is the small
adapter that runs the forward passes and hands arrays to the objective.

The stages live in training/stages/ (and training/rl/); training/registry.py finds them by
`config.objective.name`. This module imports no stage, so every stage can import it.
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
# evaluator(params) -> {tag: value} of held-out figures.
Evaluator = Callable[[Any], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """A model the stage uses but does not train (DPO / PPO reference, distillation teacher)."""
  model_config: ml_collections.ConfigDict
  path: str              # workdir, checkpoints dir or step dir of the run that trained it
  kind: str = "decoder"  # models/build.py MODEL_CLASSES key


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What a stage's own held-out evaluation is built from (once per run)."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  spec: Any                       # the model `params` bind to (a LoRA run's merged base)
  mesh: jax.sharding.Mesh
  rules: Any
  workdir: str


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  loss_fn: LossFn
  make_dataset: Callable[..., Any]
  model_kind: str = "decoder"
  frozen_models: Callable[[ml_collections.ConfigDict], dict[str, FrozenModel]] = (
      lambda config: {})
  make_evaluator: Callable[[EvalContext], Evaluator] | None = None
  prepare: Callable[..., None] | None = None
  # A loop of its own, `train(config, workdir) -> final metrics`, run by scripts/train.py
  # instead of training/loop.py's (the RL stages: sample, score, update; training/rl).
  train: Callable[..., dict[str, float]] | None = None
  # `abstract_batch(config) -> {name: jax.ShapeDtypeStruct}`: the shapes and dtypes of one global
  # batch, exactly as `make_dataset` yields it, with no data read (scripts/compile_check.py
  # compiles the train step from it for a TPU pod).
  abstract_batch: Callable[[ml_collections.ConfigDict], dict[str, Any]] | None = None


def batch_tokens(batch: Mapping[str, Any]) -> int:
  """Real (non-padding) tokens in a batch, for throughput."""
  return int((batch["segment_ids"] > 0).sum())

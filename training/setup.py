"""`build_setup(config)`: mesh, rules, model, optimizer, abstract state and steps of one run.

Everything that trains, checks or measures a stage builds it here, from the config alone:

    mesh (parallel/mesh.py) + logical-axis rules (parallel/rules.py)
      -> the stage's model spec (models/build.py), wrapped in
         LoRA adapters when `config.lora.enabled` (models/lora.py), or freezing all but
         `config.train.trainable` of it (training/trainable.py)
      -> optimizer + schedule (training/optimizer.py; only the trained parts have state)
      -> abstract train state: shapes with shardings, no memory (training/state.py)
      -> frozen models: the stage's (reference, teacher) and a LoRA run's base, restored
         sharded (training/runs.py), or only their shapes (`abstract=True`, for AOT compiles)
      -> jitted, sharded train and eval steps (training/step.py)

Users: the supervised loop (training/loop.py), the RL trainer (training/rl/loop.py, with its
own actor-critic spec), scripts/compile_check.py (shapes only, for a TPU topology),
scripts/evaluate.py and scripts/benchmark.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections
import optax
from absl import logging

from configs.run_layout import run_dir
from models.build import ModelSpec, Params, build_model_spec
from models.lora import LoraSpec, is_enabled as lora_enabled, make_lora_spec
from parallel.mesh import make_mesh
from parallel.rules import Rules, batch_sharding, get_rules
from training.optimizer import make_optimizer
from training.runs import load_params, sharded_target
from training.stage import Stage
from training.state import TrainState, abstract_train_state, init_train_state, shardings_of
from training.step import LORA_BASE, make_eval_step, make_train_step
from training.trainable import PartialSpec, trainable_parts


@dataclasses.dataclass(frozen=True)
class Frozen:
  """The models a step uses but never trains, by name: specs (bound inside the step), params
  (arrays, or ShapeDtypeStructs for an AOT compile) and their shardings. A LoRA run's base
  is `params[LORA_BASE]` (no spec: the LoRA spec binds it)."""
  specs: dict[str, ModelSpec]
  params: dict[str, Any]
  shardings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What one run is built from; see the module docstring."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: Rules
  stage: Stage
  base_spec: ModelSpec             # the model (a LoRA run: the model its adapters modify)
  spec: ModelSpec | LoraSpec       # what the train state holds
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState       # ShapeDtypeStructs with shardings

  @property
  def shardings(self) -> TrainState:
    return shardings_of(self.abstract_state)

  @property
  def data_sharding(self) -> jax.sharding.NamedSharding:
    return batch_sharding(self.mesh, self.rules)

  @property
  def lora(self) -> bool:
    return isinstance(self.spec, LoraSpec)

  def fresh_state(self) -> TrainState:
    """A new train state, initialised directly into its shardings."""
    return init_train_state(self.spec, self.optimizer, self.abstract_state, self.config.seed)

  def load_frozen(self, *, abstract: bool = False) -> Frozen:
    """The stage's frozen models and a LoRA run's base (see `Frozen`), restored sharded from
    their runs, or (`abstract`) as sharded shapes only.

    A frozen model that is the LoRA run's base (the same run and param shapes: the DPO / PPO
    reference of a LoRA run) shares its arrays instead of being loaded twice.
    """
    specs, params, shardings = {}, {}, {}
    base = None
    if self.lora:
      if not (abstract or self.config.init_from):
        raise ValueError("config.lora.enabled needs config.init_from: the base model to adapt")
      spec = self.spec
      target = sharded_target(spec.base_shapes, spec.base_logical_axes, self.mesh, self.rules)
      base = target if abstract else load_params(
          self.config.init_from, spec.base, self.mesh, self.rules, shapes=spec.base_shapes,
          logical_axes=spec.base_logical_axes)
      params[LORA_BASE], shardings[LORA_BASE] = base, _shardings(target)
    for name, frozen in self.stage.frozen_models(self.config).items():
      spec = build_model_spec(frozen.model_config, frozen.kind)
      specs[name] = spec
      if base is not None and self._is_lora_base(frozen.path, spec):
        params[name], shardings[name] = base, shardings[LORA_BASE]
        logging.info("frozen %s model shares the LoRA base's params", name)
        continue
      target = sharded_target(spec.shapes, spec.logical_axes, self.mesh, self.rules)
      params[name] = target if abstract else load_params(frozen.path, spec, self.mesh,
                                                          self.rules)
      shardings[name] = _shardings(target)
      if not abstract:
        logging.info("frozen %s model loaded from %s", name, frozen.path)
    return Frozen(specs, params, shardings)

  def _is_lora_base(self, path: str, spec: ModelSpec) -> bool:
    """Whether a frozen model is the LoRA run's base: the same run and param shapes."""
    same_run = (os.path.abspath(run_dir(path))
                == os.path.abspath(run_dir(self.config.init_from)))
    base_shapes = self.spec.base_shapes
    return same_run and jax.tree.structure(spec.shapes) == jax.tree.structure(base_shapes) and (
        all(a.shape == b.shape for a, b in zip(jax.tree.leaves(spec.shapes),
                                               jax.tree.leaves(base_shapes))))

  def train_step(self, frozen: Frozen | None = None, *, donate: bool = True):
    """The jitted, sharded, donated train step (training/step.py) of this run."""
    frozen = frozen or Frozen({}, {}, {})
    return make_train_step(self.spec, self.stage.loss_fn, self.optimizer, self.schedule,
                           self.config.objective, mesh=self.mesh, rules=self.rules,
                           shardings=self.shardings,
                           grad_accum_steps=self.config.train.grad_accum_steps, donate=donate,
                           frozen_specs=frozen.specs, frozen_shardings=frozen.shardings,
                           skip_nonfinite=self.config.train.get("nonfinite") == "skip")

  def eval_step(self, frozen: Frozen | None = None, params_shardings: Params | None = None):
    """The jitted eval step; `params_shardings` default: the train state's params'."""
    frozen = frozen or Frozen({}, {}, {})
    return make_eval_step(self.spec, self.stage.loss_fn, self.config.objective, mesh=self.mesh,
                          rules=self.rules,
                          params_shardings=(self.shardings["params"] if params_shardings is None
                                            else params_shardings),
                          frozen_specs=frozen.specs, frozen_shardings=frozen.shardings)


def _shardings(tree: Any) -> Any:
  return jax.tree.map(lambda a: a.sharding, tree)


def build_setup(config: ml_collections.ConfigDict, stage: Stage, *,
                devices: Sequence[Any] | None = None, spec: ModelSpec | None = None,
                total_updates: int | None = None) -> RunSetup:
  """Builds `config`'s run from shapes only (no params are made or read).

  Args:
    config: a stage config.
    stage: its stage (training/registry.py `get_stage(config.objective.name)`).
    devices: the devices of the mesh (default: this job's; a TPU topology's for AOT checks).
    spec: the model to train instead of the stage's `model_kind` (the RL actor-critic).
    total_updates: optimizer updates the schedule spans (default `config.train.steps`).
  """
  base_spec = spec or build_model_spec(config.model, stage.model_kind)
  # Checked before the mesh: a bad `train.trainable` is one line naming its key.
  parts = trainable_parts(config.train, base_spec)
  if parts is not None and lora_enabled(config):
    raise ValueError(f"config.train.trainable={parts.mode!r} with config.lora.enabled: LoRA "
                     "already trains only its adapters and heads; keep trainable='all'")
  mesh = make_mesh(config.mesh, devices)
  rules = get_rules(config.mesh.rules)
  if lora_enabled(config):
    trained = make_lora_spec(base_spec, config.lora)
  else:
    trained = base_spec if parts is None else PartialSpec.wrap(base_spec, parts)
  if parts is not None:
    logging.info("config.train.trainable=%s: %d params train, %d are frozen", parts.mode,
                 *parts.count(base_spec.shapes))
  optimizer, schedule = make_optimizer(
      config.optimizer, config.train.steps if total_updates is None else total_updates, parts)
  abstract_state = abstract_train_state(trained, optimizer, mesh, rules)
  return RunSetup(config=config, mesh=mesh, rules=rules, stage=stage, base_spec=base_spec,
                  spec=trained, optimizer=optimizer, schedule=schedule,
                  abstract_state=abstract_state)

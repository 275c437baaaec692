"""Loading a run's model: `load_model(run, ...)`, the one way every caller restores a model.

    run (workdir | checkpoints dir | step dir; configs/run_layout.py)
      -> its config.json: model config and model kind (decoder | encoder | reward)
      -> ModelSpec (models/build.py), shapes -> shardings over the given mesh (parallel/rules)
      -> params restored straight into those shardings (training/checkpoint.py)
      -> a LoRA run (its checkpoint holds adapters and heads only): its base, from the run's
         own `init_from` (itself loaded by `load_params`, so a LoRA run over a LoRA run
         works), merged with the adapters: W + (alpha / r) A @ B
      -> the run's tokenizer (its config's `data.tokenizer`, else `tokenizer/spm.model` or a
         converted model's `tokenizer/tokenizer.json`)

Frozen models (a DPO / PPO reference, a distillation teacher, a reward model), generation,
evaluation, a LoRA run's frozen base and the reward scorer all come through `load_params` /
`load_model`. A checkpoint holding more params than the spec asks for (an RL policy's value
head, a decoder's LM head under a reward model) is read partially: the rest is ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import models  # noqa: F401  (sets flax's variable-sharding mode before any module is built)
from configs.run_layout import (configured_tokenizer, has_run_config, read_run_config,
                                recorded_model_kind)
from data.tokenizer import load_tokenizer
from models import lora as lora_lib
from models.build import ModelSpec, Params, build_model_spec
from models.convert.layout import get_path, set_path
from parallel.mesh import make_mesh
from parallel.rules import Rules, get_rules, tree_shardings
from training.checkpoint import Checkpointer

# The model kind of runs written before config.json recorded it, by objective (the stage
# registry's `model_kind`; tests/training/test_runs.py checks the two agree).
_LEGACY_KINDS = {"mlm": "encoder", "reward": "reward", "classify": "classifier",
                 "classify_encoder": "encoder_classifier"}


def run_model_kind(config: ml_collections.ConfigDict) -> str:
  """decoder | encoder | reward: what the run's checkpoints hold (an RL policy loads as a
  decoder; its value head is ignored)."""
  kind = recorded_model_kind(config)
  if kind:
    return kind
  return _LEGACY_KINDS.get(config.get("objective", {}).get("name", ""), "decoder")


def sharded_target(shapes: Params, logical_axes: Params, mesh: jax.sharding.Mesh,
                   rules: Rules) -> Params:
  """`shapes` as ShapeDtypeStructs carrying their shardings over `mesh` (a restore target)."""
  shardings = tree_shardings(logical_axes, shapes, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def init_params(spec: ModelSpec, mesh: jax.sharding.Mesh, rules: Rules, seed: int) -> Params:
  """Fresh random params, initialised directly into their shardings (benchmarks, tests)."""
  shardings = tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  return jax.jit(spec.init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def load_params(run: str, spec: ModelSpec, mesh: jax.sharding.Mesh, rules: Rules, *,
                shapes: Params | None = None, logical_axes: Params | None = None) -> Params:
  """The params `spec` describes, restored from the run at `run`, sharded over `mesh`.

  A LoRA run (its config.json has `lora.enabled`) is merged onto its base. `shapes` /
  `logical_axes` restrict what is read (a LoRA run's frozen base has no heads); default:
  the whole spec.
  """
  shapes = spec.shapes if shapes is None else shapes
  logical_axes = spec.logical_axes if logical_axes is None else logical_axes
  config = read_run_config(run) if has_run_config(run) else None
  if config is None or not lora_lib.is_enabled(config):
    return Checkpointer.restore_params(run, sharded_target(shapes, logical_axes, mesh, rules))
  if not config.init_from:
    raise ValueError(f"{run}: a LoRA run without init_from has no base to merge into")
  lora = lora_lib.make_lora_spec(spec, config.lora)
  base = load_params(config.init_from, spec, mesh, rules, shapes=lora.base_shapes,
                     logical_axes=lora.base_logical_axes)
  adapters = Checkpointer.restore_params(
      run, sharded_target(lora.shapes, lora.logical_axes, mesh, rules))
  merged = jax.jit(lambda b, a: lora.merge(b, a))(base, adapters)
  logging.info("LoRA run %s merged onto its base %s", run, config.init_from)
  return {k: merged[k] for k in shapes}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A run's model, ready to run: `spec.bind(params)` is the module."""
  config: ml_collections.ConfigDict   # the run's own config (locked)
  kind: str                           # decoder | encoder | reward
  spec: ModelSpec
  params: Params                      # sharded over `mesh`
  tokenizer: Any                      # data/tokenizer.py Tokenizer | HFTokenizer | None
  mesh: jax.sharding.Mesh
  rules: Rules


def load_model(run: str, *, kind: str | None = None,
               model_config: ml_collections.ConfigDict | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
               with_tokenizer: bool = True) -> LoadedModel:
  """Restores the latest params of the run at `run` (see the module docstring).

  Args:
    run: the run's workdir, checkpoints dir or one step dir.
    kind: the model to build (default: the kind the run recorded). 'decoder' on an RL run or
      a reward run's parent reads the decoder's params only.
    model_config: build this model instead of the run's own (a stage's config.model for a
      frozen reference); the checkpoint must hold its params.
    mesh, rules: where to shard the params (default: the run's own mesh config).
    with_tokenizer: load the run's tokenizer too.
  """
  config = read_run_config(run)
  kind = kind or run_model_kind(config)
  if mesh is None:
    mesh = make_mesh(config.mesh)
  rules = rules if rules is not None else get_rules(config.mesh.rules)
  spec = build_model_spec(model_config if model_config is not None else config.model, kind)
  params = load_params(run, spec, mesh, rules)
  tokenizer = load_tokenizer(configured_tokenizer(run, config)) if with_tokenizer else None
  return LoadedModel(config, kind, spec, params, tokenizer, mesh, rules)


class ParamReader:
  """One param at a time from a run's latest checkpoint, as numpy on one device (a LoRA run's
  target weights merged as W + (alpha / r) A @ B from its base and adapters): a streaming
  export never holds the whole model twice."""

  def __init__(self, run: str, kind: str | None = None):
    self.run = run
    self.config = read_run_config(run)
    self.kind = kind or run_model_kind(self.config)
    self.spec = build_model_spec(self.config.model, self.kind)
    self.device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self.lora = None
    if lora_lib.is_enabled(self.config):
      if not self.config.init_from:
        raise ValueError(f"{run}: a LoRA run without init_from has no base to merge into")
      self.lora = lora_lib.make_lora_spec(self.spec, self.config.lora)
      self.base = ParamReader(self.config.init_from, self.kind)
      self.targets = {t.path: t for t in self.lora.targets}

  def _restore(self, shapes: Params, path: tuple) -> np.ndarray:
    leaf = get_path(shapes, path)
    target: dict = {}
    set_path(target, path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self.device))
    restored = Checkpointer.restore_params(self.run, target)
    return np.asarray(jax.device_get(get_path(restored, path)))

  def get(self, path: tuple) -> np.ndarray:
    """The param at `path` (a tuple of keys into `spec.shapes`)."""
    if self.lora is None:
      return self._restore(self.spec.shapes, path)
    if path[0] in self.lora.heads:  # trained in full by the LoRA run
      return self._restore(self.lora.shapes, path)
    base = self.base.get(path)
    if path not in self.targets:
      return base
    a = self._restore(self.lora.shapes, path + ("a",))
    b = self._restore(self.lora.shapes, path + ("b",))
    t = self.targets[path]
    return np.asarray(base + lora_lib.lora_delta(a, b, base.shape, t.n_stack, self.lora.scale))

"""The generic train and eval steps, jitted with explicit shardings and state donation.

Gradient accumulation: the global batch is split into `grad_accum_steps` micro-batches whose
loss *sums* and gradients are added up by `lax.scan`, then divided once by the total weight, so
the update equals that of one large batch exactly (not a mean of per-micro-batch means).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from models.build import ModelSpec
from models.lora import LoraSpec
from objectives.reductions import Metrics, add_metrics
from parallel.rules import Rules, batch_sharding, constrain, use_mesh_rules
from training.stage import LossFn
from training.state import TrainState


# frozen_params key of a LoRA run's frozen base model (training/setup.py `load_frozen`).
LORA_BASE = "lora_base"
# Folded into the step's RNG for the adapter dropout, independent of the stage's own draws.
_LORA_SALT = 0x10A


def _split_micro_batches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, ...] -> [n, B/n, ...] taking rows strided (row i goes to micro-batch i % n), so every
  device's local rows are spread evenly over the micro-batches and no data moves."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps {n}")
    y = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))
  return jax.tree.map(split, batch)


def bind_frozen(frozen_specs: dict[str, ModelSpec], frozen_params: dict[str, Any]) -> dict:
  """Frozen models (reference, teacher) bound from params no gradient flows into."""
  return {name: frozen_specs[name].bind(jax.lax.stop_gradient(frozen_params[name]))
          for name in frozen_specs}


def bind_trained(spec: ModelSpec | LoraSpec, params: Any, frozen_params: dict[str, Any],
                 rng: jax.Array | None = None):
  """The model being trained. For LoRA (`spec` a models/lora.py `LoraSpec`) `params` are the
  adapters (and heads) and the frozen base comes in as `frozen_params[LORA_BASE]`; `rng`
  draws the adapter dropout (None: none, as in evaluation)."""
  if isinstance(spec, LoraSpec):
    return spec.bind(params, jax.lax.stop_gradient(frozen_params[LORA_BASE]), rng)
  return spec.bind(params)


def make_train_step(spec: ModelSpec, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, objective_cfg: ml_collections.ConfigDict, *,
                    mesh: Mesh, rules: Rules, shardings: TrainState, grad_accum_steps: int = 1,
                    donate: bool = True, frozen_specs: dict[str, ModelSpec] | None = None,
                    frozen_shardings: dict[str, Any] | None = None,
                    skip_nonfinite: bool = False):
  """Returns `step(state, batch, frozen_params={}) -> (state, metrics)`, jitted over `mesh`.

  `frozen_params` maps the names of `frozen_specs` to their params (not trained, not donated).
  `metrics` holds `(sum, weight)` pairs from the objective plus scalars `grad_norm`, `lr` and
  `nonfinite` (1 when the loss or gradient norm was not finite; as `(value, 1)`), so the
  caller can average them over steps exactly. `skip_nonfinite` (config.train.nonfinite 'skip')
  drops such a step's update: params and optimizer state come out unchanged.
  """
  frozen_specs = frozen_specs or {}

  def loss_sum(params, batch, rng, frozen_params):
    frozen = bind_frozen(frozen_specs, frozen_params)
    model = bind_trained(spec, params, frozen_params, jax.random.fold_in(rng, _LORA_SALT))
    per_token, metrics = loss_fn(model, batch, rng, objective_cfg, frozen)
    del per_token
    return metrics["loss"][0], metrics

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(state: TrainState, batch: dict[str, jax.Array],
           frozen_params: dict[str, Any]) -> tuple[TrainState, Metrics]:
    with use_mesh_rules(mesh, rules):
      rng, step_rng = jax.random.split(state["rng"])
      params = state["params"]
      if grad_accum_steps == 1:
        (_, metrics), grads = grad_fn(params, batch, step_rng, frozen_params)
      else:
        micro = _split_micro_batches(batch, grad_accum_steps)
        rngs = jax.random.split(step_rng, grad_accum_steps)
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        _, zero_metrics = jax.eval_shape(loss_sum, params, jax.tree.map(lambda x: x[0], micro),
                                         rngs[0], frozen_params)
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics)

        def accumulate(carry, xs):
          grads_acc, metrics_acc = carry
          mb, mb_rng = xs
          (_, m), g = grad_fn(params, mb, mb_rng, frozen_params)
          return (jax.tree.map(jnp.add, grads_acc, g), add_metrics(metrics_acc, m)), None

        (grads, metrics), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics), (micro, rngs))
      weight = jnp.maximum(metrics["loss"][1], 1.0)
      grads = jax.tree.map(lambda g: g / weight, grads)
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = optimizer.update(grads, state["opt_state"], params)
      # `nonfinite` tells the loop (training/outer_loop.py) that the loss or gradient norm was
      # not finite: it stops before the next checkpoint ('stop'), or, with `skip_nonfinite`,
      # the step drops its whole update here (params and optimizer state stay as they were)
      # and the loop counts it. Only 'skip' pays for the select: it keeps the old state alive
      # next to the new one.
      finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm)
      new_params, new_opt_state = optax.apply_updates(params, updates), opt_state
      if skip_nonfinite:
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_params = keep(new_params, params)
        new_opt_state = keep(new_opt_state, state["opt_state"])
      new_state = {"params": new_params, "opt_state": new_opt_state,
                   "step": state["step"] + 1, "rng": rng}
      one = jnp.ones((), jnp.float32)
      metrics = dict(metrics, grad_norm=(grad_norm, one),
                     lr=(jnp.asarray(schedule(state["step"]), jnp.float32), one),
                     nonfinite=(1.0 - finite.astype(jnp.float32), one))
      return new_state, metrics

  data_sharding = batch_sharding(mesh, rules)
  jitted = jax.jit(step, in_shardings=(shardings, data_sharding, frozen_shardings or {}),
                   out_shardings=(shardings, None), donate_argnums=(0,) if donate else ())
  run = lambda state, batch, frozen_params=None: jitted(state, batch, frozen_params or {})
  # Ahead-of-time compilation (scripts/compile_check.py) lowers this very step from shapes.
  run.lower = lambda state, batch, frozen_params=None: jitted.lower(state, batch,
                                                                    frozen_params or {})
  return run


def make_eval_step(spec: ModelSpec, loss_fn: LossFn, objective_cfg: ml_collections.ConfigDict,
                   *, mesh: Mesh, rules: Rules, params_shardings: Any,
                   frozen_specs: dict[str, ModelSpec] | None = None,
                   frozen_shardings: dict[str, Any] | None = None):
  """Returns `eval_step(params, batch, frozen_params={}) -> metrics` ((sum, weight) pairs)."""
  frozen_specs = frozen_specs or {}

  def eval_step(params, batch, frozen_params):
    with use_mesh_rules(mesh, rules):
      frozen = bind_frozen(frozen_specs, frozen_params)
      _, metrics = loss_fn(bind_trained(spec, params, frozen_params), batch,
                           jax.random.PRNGKey(0), objective_cfg, frozen)
      return metrics

  jitted = jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding(mesh, rules),
                                            frozen_shardings or {}))
  return lambda params, batch, frozen_params=None: jitted(params, batch, frozen_params or {})

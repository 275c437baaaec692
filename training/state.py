"""The train state: a plain dict of pytrees {params, opt_state, step, rng}, created sharded.

Shapes first (`jax.eval_shape`), then shardings from logical rules, then a jitted init with
`out_shardings`: no parameter is ever materialised whole on one device. With LoRA the `spec`
is a models/lora.py `LoraSpec` (same `init` / `shapes` / `logical_axes`), so the state's params
are the adapters only and everything below works on them unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.build import ModelSpec, Params
from parallel.rules import Rules, tree_shardings

TrainState = dict[str, Any]


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def optimizer_shardings(opt_state: Any, params_shardings: Params, mesh: Mesh) -> Any:
  """Each optimizer-state leaf that mirrors a parameter (Adam's mu / nu, ...) gets that
  parameter's sharding; scalars (step counts) are replicated. Anything else is an error."""
  by_path = {_path_keys(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_shardings)}
  replicated = NamedSharding(mesh, P())

  def leaf_sharding(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      if keys[start:] in by_path:
        return by_path[keys[start:]]
    if getattr(leaf, "ndim", 0) == 0:
      return replicated
    raise ValueError(f"optimizer state leaf {jax.tree_util.keystr(path)} {leaf.shape} mirrors no "
                     "parameter; cannot choose its sharding")
  return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def state_shardings(abstract_state: TrainState, spec: ModelSpec, mesh: Mesh,
                    rules: Rules) -> TrainState:
  params = tree_shardings(spec.logical_axes, abstract_state["params"], mesh, rules)
  replicated = NamedSharding(mesh, P())
  return {
      "params": params,
      "opt_state": optimizer_shardings(abstract_state["opt_state"], params, mesh),
      "step": replicated,
      "rng": replicated,
  }


def init_train_state_fn(spec: ModelSpec, optimizer: optax.GradientTransformation):
  def init(seed_key: jax.Array) -> TrainState:
    init_key, state_key = jax.random.split(seed_key)
    params = spec.init(init_key)
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": state_key}
  return init


def abstract_train_state(spec: ModelSpec, optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules: Rules) -> TrainState:
  """The state's shapes as ShapeDtypeStructs carrying their shardings; no memory is used.

  This is both the `out_shardings` of a fresh init and the target a checkpoint restores into.
  """
  abstract = jax.eval_shape(init_train_state_fn(spec, optimizer), jax.random.PRNGKey(0))
  shardings = state_shardings(abstract, spec, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def shardings_of(abstract_state: TrainState) -> TrainState:
  return jax.tree.map(lambda a: a.sharding, abstract_state)


def init_train_state(spec: ModelSpec, optimizer: optax.GradientTransformation,
                     abstract_state: TrainState, seed: int) -> TrainState:
  """A fresh state, initialised directly into its shardings by a jitted init."""
  init = jax.jit(init_train_state_fn(spec, optimizer), out_shardings=shardings_of(abstract_state))
  return init(jax.random.PRNGKey(seed))


def create_train_state(spec: ModelSpec, optimizer: optax.GradientTransformation, mesh: Mesh,
                       rules: Rules, seed: int) -> tuple[TrainState, TrainState]:
  """Returns (state, shardings) of a fresh state."""
  abstract = abstract_train_state(spec, optimizer, mesh, rules)
  return init_train_state(spec, optimizer, abstract, seed), shardings_of(abstract)

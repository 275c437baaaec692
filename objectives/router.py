"""Mixture-of-experts router losses, added to a stage's objective.

    loss = task_loss + moe_aux_coef * load_balance + moe_z_coef * router_z

`load_balance` (Switch Transformer, Fedus et al., 2021, eq. 4) and `router_z` (ST-MoE, Zoph et
al., 2022, eq. 5) are per-model scalars (models/moe.py, averaged over the MoE layers). Metrics
here are `(sum, weight)` pairs divided at the end (objectives/reductions.py), so a scalar joins
the loss as `coef * value * weight`: the divided loss gains `coef * value`, and gradient
accumulation over micro-batches averages the router terms by tokens as it does the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.reductions import Metrics


def add_router_losses(metrics: Metrics, aux: dict[str, jax.Array], *, aux_coef: float,
                      z_coef: float) -> Metrics:
  """`metrics` with the weighted router losses added to `loss` and reported on their own.

  Args:
    metrics: a stage's `(sum, weight)` metrics with a `loss` entry.
    aux: `{"load_balance": scalar, "router_z": scalar}` (models/moe.py `pop_aux`).
    aux_coef, z_coef: their coefficients (config.model.moe_aux_coef / moe_z_coef).
  Returns:
    New metrics: `loss` includes the terms; `moe_load_balance`, `moe_router_z` the raw values.
  """
  loss_sum, weight = metrics["loss"]
  load = jnp.asarray(aux["load_balance"], jnp.float32)
  z = jnp.asarray(aux["router_z"], jnp.float32)
  extra = aux_coef * load + z_coef * z
  return {**metrics, "loss": (loss_sum + extra * weight, weight),
          "moe_load_balance": (load * weight, weight), "moe_router_z": (z * weight, weight)}

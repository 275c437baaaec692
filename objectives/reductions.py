"""Exact reductions shared by every objective.

A metric is a pair `(sum, weight)`. Objectives return sums, never means: summing pairs across
micro-batches, devices and hosts and dividing once at the end gives exactly the mean over the
whole batch, however it was split (averaging per-micro-batch means would not).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]
Metrics = dict[str, Metric]


def weighted_sum(values: jax.Array, weights: jax.Array) -> Metric:
  """`(sum(values * weights), sum(weights))` in float32; values where weight is 0 are ignored
  even if they are inf/nan."""
  weights = weights.astype(jnp.float32)
  values = jnp.where(weights > 0, values.astype(jnp.float32), 0.0)
  return jnp.sum(values * weights), jnp.sum(weights)


def add_metrics(a: Metrics, b: Metrics) -> Metrics:
  return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def finalize_metrics(metrics: Mapping[str, Metric]) -> dict[str, jax.Array]:
  """sum / weight for each metric (0 where the weight is 0)."""
  return {k: jnp.where(w > 0, s / jnp.maximum(w, 1e-30), 0.0) for k, (s, w) in metrics.items()}

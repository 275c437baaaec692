"""Batches of a stage's data as the mesh wants them, and held-out loss over an eval split.

    stage_batches   the host-local rows of every global batch: each host reads the data shards
                    behind its rows (parallel/host_data.py), so no host reads the whole batch
    global_batch    those rows -> one global array per field, laid out by the batch sharding
    SplitEvaluator  mean (sum, weight) metrics of an eval step over the first N batches of a
                    fresh eval iterator: the loop's `eval/*`, scripts/evaluate.py's figures and
                    CPT's `eval_replay/*` are all this

The train loop (training/loop.py), scripts/evaluate.py and the stages' own evaluators share
these, so an evaluation reads the same batches wherever it runs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from objectives.reductions import add_metrics, finalize_metrics
from parallel.host_data import ShardedBatches

# (config, tokenizer, *, split, batch_size, shard_index, shard_count, seed, num_epochs,
# workdir) -> a grain dataset of this host's packed batches (training/stage.py make_dataset).
DatasetFn = Callable[..., Any]


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                 size: int) -> dict[str, jax.Array]:
  """Assembles the `size`-row global batch from this host's rows (each host passes only the
  rows its devices hold)."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (size,) + v.shape[1:])
          for k, v in local.items()}


def stage_batches(make_dataset: DatasetFn, config: ml_collections.ConfigDict, tokenizer, *,
                  split: str, sharding: jax.sharding.Sharding, workdir: str,
                  num_epochs: int | None = None) -> ShardedBatches:
  """This host's rows of each global batch of `split` (`config.data.global_batch_size` rows).

  A fixed `config.data.num_shards` makes the batches the same on any number of hosts and any
  mesh; 0 gives one shard per host's block of rows.
  """
  return ShardedBatches.for_sharding(
      lambda index, count, rows: iter(make_dataset(
          config, tokenizer, split=split, batch_size=rows, shard_index=index,
          shard_count=count, seed=config.seed, num_epochs=num_epochs, workdir=workdir)),
      sharding, config.data.global_batch_size, config.data.num_shards)


class SplitEvaluator:
  """`evaluator(params, frozen_params=None) -> {prefix/metric: mean}` over an eval split.

  Each call reads the first `steps` batches of a fresh iterator (`make_iter()`), so every
  evaluation of a run sees the same batches.
  """

  def __init__(self, eval_step: Callable, make_iter: Callable[[], Any], *, steps: int,
               sharding: jax.sharding.Sharding, size: int, prefix: str = "eval"):
    self.eval_step = eval_step
    self.make_iter = make_iter
    self.steps = steps
    self.sharding = sharding
    self.size = size
    self.prefix = prefix

  def __call__(self, params, frozen_params=None) -> dict[str, float]:
    total = None
    iterator = self.make_iter()
    for _ in range(self.steps):
      try:
        local = next(iterator)
      except StopIteration:
        break
      metrics = self.eval_step(params, global_batch(local, self.sharding, self.size),
                               frozen_params)
      total = metrics if total is None else add_metrics(total, metrics)
    if total is None:
      return {}
    return {f"{self.prefix}/{k}": float(v) for k, v in finalize_metrics(total).items()}

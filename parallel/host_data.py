"""Per-host input: which rows of the global batch this process feeds, read from data shards.

The global batch `[global_batch, ...]` is cut into `num_shards` equal blocks of rows; block k
always comes from data shard k (documents k, k + num_shards, ...), whatever the hardware. Each
process reads the shards whose rows its devices hold and `jax.make_array_from_process_local_data`
assembles the global array, so no host ever reads the whole batch. With a fixed `num_shards` the
batches are the same on 1 process or 64, on any mesh: a run can be checked against a
single-process run and resumed on a different number of hosts with the same data order.

Processes whose devices hold the same rows (a tensor-parallel group spanning hosts) read the same
shards; the pipelines are deterministic, so they produce the same rows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

Batch = dict[str, np.ndarray]
# (shard_index, num_shards, rows) -> iterator of `rows`-row batches with get_state / set_state.
ShardIteratorFn = Callable[[int, int, int], Iterator[Batch]]


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
  """The rows `[start, stop)` of a `[global_batch, ...]` array this process's devices hold.

  Raises:
    ValueError: the rows are not one contiguous block (a device order the loader cannot feed).
  """
  index_map = sharding.addressable_devices_indices_map((global_batch, 1))
  spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                  for s in index_map.values()})
  start, stop = spans[0][0], spans[0][1]
  for lo, hi in spans[1:]:
    if lo != stop:
      raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}")
    stop = hi
  return start, stop


def process_shards(rows: tuple[int, int], global_batch: int,
                   num_shards: int) -> tuple[range, int]:
  """The data shards covering `rows`, and their total (`num_shards`, or if that is 0 one shard
  per block of `rows`: each process reads exactly one shard).

  Raises:
    ValueError: the shards do not divide the batch or do not line up with `rows`.
  """
  start, stop = rows
  if num_shards <= 0:
    num_shards = global_batch // (stop - start)
  if global_batch % num_shards:
    raise ValueError(f"config.data.num_shards {num_shards} does not divide the global batch "
                     f"{global_batch}")
  size = global_batch // num_shards
  if start % size or stop % size:
    raise ValueError(f"this process feeds batch rows [{start}, {stop}), which do not line up "
                     f"with {num_shards} data shards of {size} rows; choose num_shards so that "
                     f"{stop - start} is a multiple of {global_batch} / num_shards")
  return range(start // size, stop // size), num_shards


class ShardedBatches:
  """This process's rows of each global batch, concatenated from its data shards' iterators.

  State (`get_state`) maps every shard this process reads to its iterator's state, so the
  states that all processes saved can be merged and handed to a different set of processes.
  """

  def __init__(self, make_shard_iter: ShardIteratorFn, shards: Sequence[int], num_shards: int,
               rows_per_shard: int):
    self.shards = list(shards)
    self.num_shards = num_shards
    self._iters = {k: make_shard_iter(k, num_shards, rows_per_shard) for k in self.shards}

  @classmethod
  def for_sharding(cls, make_shard_iter: ShardIteratorFn, sharding: jax.sharding.Sharding,
                   global_batch: int, num_shards: int = 0) -> ShardedBatches:
    """The shards that feed this process's rows of a batch laid out by `sharding`."""
    shards, total = process_shards(process_rows(sharding, global_batch), global_batch,
                                   num_shards)
    return cls(make_shard_iter, shards, total, global_batch // total)

  def __iter__(self) -> ShardedBatches:
    return self

  def __next__(self) -> Batch:
    parts = [next(self._iters[k]) for k in self.shards]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"num_shards": self.num_shards,
            "shards": {str(k): it.get_state() for k, it in self._iters.items()}}

  def set_state(self, saved: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
    """Restores from one saved state or the list all processes saved (merged by shard).

    Raises:
      ValueError: the saved states were written with another number of shards, or lack one
        of this process's shards.
    """
    states = [saved] if isinstance(saved, dict) else [s for s in saved if s]
    merged: dict[str, Any] = {}
    for state in states:
      if state.get("num_shards") != self.num_shards:
        raise ValueError(f"the data state was saved with {state.get('num_shards')} data shards, "
                         f"this run reads {self.num_shards}")
      merged.update(state["shards"])
    missing = [k for k in self.shards if str(k) not in merged]
    if missing:
      raise ValueError(f"no saved data state for shards {missing}")
    for k in self.shards:
      self._iters[k].set_state(merged[str(k)])

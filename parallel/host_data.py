"""Per-host input: which rows of the global batch this process feeds, read from data shards.

The global batch `[global_batch, ...]` is cut into `num_shards` equal blocks of rows; block k
always comes from data shard k (documents k, k + num_shards, ...), whatever the hardware. Each
process reads the shards whose rows its devices hold and `jax.make_array_from_process_local_data`
assembles the global array, so no host ever reads the whole batch. With a fixed `num_shards` the
batches are the same on 1 process or 64, on any mesh: a run can be checked against a
single-process run and resumed on a different number of hosts with the same data order.

Processes whose devices hold the same rows (a tensor-parallel group spanning hosts) read the same
shards; the pipelines are deterministic, so they produce the same rows.

Arrays that every process holds in full (an RL rollout, synthesis rows) move the same way:
`to_global` puts each process's rows of a numpy batch onto its devices as one global
batch-sharded array, `to_host` brings a (possibly multi-host) result back to every host, and
`batch_shards` says how many ways the mesh splits a batch.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from parallel.rules import batch_sharding, logical_to_spec, spec_size

Batch = dict[str, np.ndarray]
# (shard_index, num_shards, rows) -> iterator of `rows`-row batches with get_state / set_state.
ShardIteratorFn = Callable[[int, int, int], Iterator[Batch]]


def row_blocks(sharding: jax.sharding.Sharding,
               global_batch: int) -> dict[int, list[tuple[int, int]]]:
  """For every process, the rows `[start, stop)` of a `[global_batch, ...]` array its devices
  hold, as sorted, merged intervals. A process may hold several separate blocks (a pod's mesh
  follows the chip torus, not the hosts); its local data is then their concatenation in row
  order, as `jax.make_array_from_process_local_data` expects."""
  spans: dict[int, set[tuple[int, int]]] = collections.defaultdict(set)
  for device, index in sharding.devices_indices_map((global_batch, 1)).items():
    rows = index[0]
    spans[device.process_index].add((rows.start or 0,
                                     global_batch if rows.stop is None else rows.stop))
  blocks = {}
  for process, intervals in spans.items():
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
      if merged and lo <= merged[-1][1]:
        merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
      else:
        merged.append((lo, hi))
    blocks[process] = merged
  return blocks


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
  """This process's rows `[start, stop)` when they form one block (see `row_blocks`).

  Raises:
    ValueError: the process holds several separate blocks of rows.
  """
  blocks = row_blocks(sharding, global_batch)[jax.process_index()]
  if len(blocks) != 1:
    raise ValueError(f"process {jax.process_index()} holds separate batch rows {blocks}")
  return blocks[0]


def process_shards(blocks: dict[int, list[tuple[int, int]]], process: int, global_batch: int,
                   num_shards: int) -> tuple[list[int], int]:
  """The data shards behind `process`'s rows, in row order, and the number of shards.

  `num_shards` 0 picks the coarsest shards every process's blocks line up with: one per host
  when each host holds one block. All processes compute the same number from `blocks`.

  Raises:
    ValueError: the shards do not divide the batch or do not line up with the rows.
  """
  if num_shards <= 0:
    num_shards = global_batch // math.gcd(
        global_batch, *(edge for spans in blocks.values() for span in spans for edge in span))
  if global_batch % num_shards:
    raise ValueError(f"config.data.num_shards {num_shards} does not divide the global batch "
                     f"{global_batch}")
  size = global_batch // num_shards
  shards = []
  for start, stop in blocks[process]:
    if start % size or stop % size:
      raise ValueError(f"process {process} feeds batch rows [{start}, {stop}), which do not "
                       f"line up with {num_shards} data shards of {size} rows; choose "
                       f"config.data.num_shards so that {global_batch} / num_shards divides "
                       f"{start} and {stop}")
    shards.extend(range(start // size, stop // size))
  return shards, num_shards


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
    shards, total = process_shards(row_blocks(sharding, global_batch), jax.process_index(),
                                   global_batch, num_shards)
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


# --- Arrays every process holds in full ----------------------------------------------------

def batch_shards(mesh: jax.sharding.Mesh, rules) -> int:
  """How many ways a batch splits over the mesh (batch sizes must be multiples of it)."""
  return spec_size(mesh, logical_to_spec(("batch",), rules, mesh=mesh)[0])


def to_global(arrays: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
              rules) -> dict[str, jax.Array]:
  """Global batch-sharded arrays `[B, ...]` from host arrays `[B, ...]` every process holds in
  full; each process feeds only the rows its devices hold."""
  out = {}
  for k, v in arrays.items():
    sharding = batch_sharding(mesh, rules, ndim=v.ndim)
    # This process's rows: the blocks its devices hold, in row order.
    blocks = row_blocks(sharding, v.shape[0])[jax.process_index()]
    local = np.concatenate([v[start:stop] for start, stop in blocks])
    out[k] = jax.make_array_from_process_local_data(sharding, local, v.shape)
  return out


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host sharded) array on every host, as numpy."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))

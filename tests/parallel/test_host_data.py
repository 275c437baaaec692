"""Per-host input: rows a process feeds, the data shards behind them, merged iterator states."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallel.host_data import ShardedBatches, process_rows, process_shards, row_blocks


class CountingIterator:
  """Rows `[shard, step, row]` so every row says where it came from; state = the step."""

  def __init__(self, shard, num_shards, rows):
    self.shard, self.num_shards, self.rows, self.step = shard, num_shards, rows, 0

  def __next__(self):
    out = {"inputs": np.array([[self.shard, self.step, r] for r in range(self.rows)])}
    self.step += 1
    return out

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


def test_row_blocks_on_one_process():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  assert row_blocks(NamedSharding(mesh, P(("data", "fsdp"))), 16) == {0: [(0, 16)]}
  assert row_blocks(NamedSharding(mesh, P()), 16) == {0: [(0, 16)]}
  assert process_rows(NamedSharding(mesh, P(("data", "fsdp"))), 16) == (0, 16)


TWO_HOSTS = {0: [(0, 8)], 1: [(8, 16)]}
# A pod mesh that follows the torus can give a host separate blocks of rows.
INTERLEAVED = {0: [(0, 4), (8, 12)], 1: [(4, 8), (12, 16)]}
REPLICATED = {0: [(0, 16)], 1: [(0, 16)]}  # tensor parallelism across the two hosts


@pytest.mark.parametrize("blocks, process, num_shards, want", [
    ({0: [(0, 16)]}, 0, 0, ([0], 1)),      # one process: one shard, the whole batch
    (TWO_HOSTS, 1, 0, ([1], 2)),           # second of two hosts
    ({0: [(0, 16)]}, 0, 2, ([0, 1], 2)),   # one process reading two fixed shards
    (TWO_HOSTS, 0, 4, ([0, 1], 4)),
    (INTERLEAVED, 0, 0, ([0, 2], 4)),
    (INTERLEAVED, 1, 8, ([2, 3, 6, 7], 8)),
    (REPLICATED, 1, 4, ([0, 1, 2, 3], 4)),
])
def test_process_shards(blocks, process, num_shards, want):
  assert process_shards(blocks, process, 16, num_shards) == want


def test_process_shards_errors():
  with pytest.raises(ValueError, match="num_shards 3 does not divide the global batch 16"):
    process_shards({0: [(0, 16)]}, 0, 16, 3)
  with pytest.raises(ValueError, match=r"process 0 feeds batch rows \[0, 4\), which do not line "
                     r"up with 2 data shards"):
    process_shards(INTERLEAVED, 0, 16, 2)


def test_two_hosts_read_the_batch_one_host_reads():
  one = ShardedBatches(CountingIterator, range(0, 2), num_shards=2, rows_per_shard=3)
  hosts = [ShardedBatches(CountingIterator, range(k, k + 1), 2, 3) for k in (0, 1)]
  for _ in range(2):
    whole = next(one)["inputs"]
    np.testing.assert_array_equal(whole, np.concatenate([next(h)["inputs"] for h in hosts]))
  assert whole[:, 0].tolist() == [0, 0, 0, 1, 1, 1] and whole[:, 1].tolist() == [1] * 6


def test_states_saved_by_two_hosts_restore_on_one():
  hosts = [ShardedBatches(CountingIterator, [k], 2, 3) for k in (0, 1)]
  for host, steps in zip(hosts, (5, 5)):
    for _ in range(steps):
      next(host)
  saved = [h.get_state() for h in hosts]
  assert saved[1] == {"num_shards": 2, "shards": {"1": {"step": 5}}}
  one = ShardedBatches(CountingIterator, [0, 1], 2, 3)
  one.set_state(saved)
  assert next(one)["inputs"][:, 1].tolist() == [5] * 6

  with pytest.raises(ValueError, match="saved with 2 data shards, this run reads 4"):
    ShardedBatches(CountingIterator, [0], 4, 3).set_state(saved)
  with pytest.raises(ValueError, match=r"no saved data state for shards \[1\]"):
    ShardedBatches(CountingIterator, [0, 1], 2, 3).set_state(saved[:1])

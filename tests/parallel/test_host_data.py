"""Per-host input: rows a process feeds, the data shards behind them, merged iterator states."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallel.host_data import ShardedBatches, process_rows, process_shards


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


def test_process_rows_on_one_process():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  assert process_rows(NamedSharding(mesh, P(("data", "fsdp"))), 16) == (0, 16)


@pytest.mark.parametrize("rows, batch, num_shards, want", [
    ((0, 16), 16, 0, (range(0, 1), 1)),     # one process: one shard, the whole batch
    ((8, 16), 16, 0, (range(1, 2), 2)),     # second of two hosts
    ((0, 16), 16, 2, (range(0, 2), 2)),     # one process reading two fixed shards
    ((4, 8), 16, 4, (range(1, 2), 4)),
    ((0, 16), 16, 4, (range(0, 4), 4)),     # batch replicated over hosts (tensor across them)
])
def test_process_shards(rows, batch, num_shards, want):
  assert process_shards(rows, batch, num_shards) == want


def test_process_shards_errors():
  with pytest.raises(ValueError, match="num_shards 3 does not divide the global batch 16"):
    process_shards((0, 16), 16, 3)
  with pytest.raises(ValueError, match=r"rows \[4, 8\), which do not line up with 2 data"):
    process_shards((4, 8), 16, 2)


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

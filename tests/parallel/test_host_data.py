"""Per-host input: rows a process feeds, the data shards behind them, merged iterator states,
arrays moved onto the mesh and back, and `config.data.num_shards` from the command line."""

import os

import jax
import numpy as np
import pytest
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from parallel.host_data import (ShardedBatches, batch_shards, process_rows, process_shards,
                                row_blocks, to_global, to_host)
from parallel.mesh import make_mesh
from parallel.rules import batch_sharding, get_rules
from training.evaluation import stage_batches

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _mesh(data, fsdp, tensor):
  return Mesh(np.array(jax.devices()[:8]).reshape(data, fsdp, tensor), ("data", "fsdp", "tensor"))


def test_host_arrays_to_the_mesh_and_back():
  rules = get_rules("fsdp_tp")
  mesh = _mesh(2, 2, 2)
  assert batch_shards(mesh, rules) == 4  # the batch splits over data x fsdp, not tensor
  assert batch_shards(_mesh(1, 1, 8), rules) == 1
  rows = {"tokens": np.arange(24, dtype=np.int32).reshape(8, 3),
          "last": np.arange(8, dtype=np.int32)}
  device = to_global(rows, mesh, rules)
  for key, value in rows.items():
    assert device[key].shape == value.shape
    assert device[key].sharding == batch_sharding(mesh, rules, ndim=value.ndim)
    # Rows 2k, 2k + 1 live on the devices of batch shard k.
    for shard in device[key].addressable_shards:
      np.testing.assert_array_equal(shard.data, value[shard.index])
    np.testing.assert_array_equal(to_host(device[key]), value)
  assert isinstance(to_host(device["tokens"]), np.ndarray)


class _CountingDataset:
  """A stage's `make_dataset` result: iterating gives a `CountingIterator` of its shard."""

  def __init__(self, shard, num_shards, rows):
    self.args = (shard, num_shards, rows)

  def __iter__(self):
    return CountingIterator(*self.args)


def _parse_config(*overrides):
  """The config as scripts/train.py's flags give it: locked, an unknown key is an error."""
  argv = ["train", f"--config={REPO}/configs/pretrain.py:tiny", *overrides]
  values = flags.FlagValues()
  # The override flags are declared from the command line the flag is defined with.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_num_shards_override_reaches_the_sharded_batches():
  config = _parse_config("--config.data.num_shards=4")
  assert config.data.num_shards == 4
  # What configs/cli.py parse_flags reports as an unknown key (what num_shards was before).
  with pytest.raises((flags.Error, AttributeError), match="num_shard"):
    _parse_config("--config.data.num_shard=4")
  calls = []

  def make_dataset(config, tokenizer, *, split, batch_size, shard_index, shard_count, **kwargs):
    calls.append((split, shard_index, shard_count, batch_size))
    return _CountingDataset(shard_index, shard_count, batch_size)

  mesh = make_mesh(config.mesh, jax.devices()[:8])
  sharding = batch_sharding(mesh, get_rules(config.mesh.rules))
  batches = stage_batches(make_dataset, config, None, split="train", sharding=sharding,
                          workdir="")
  size = config.data.global_batch_size
  assert (batches.num_shards, batches.shards) == (4, [0, 1, 2, 3])
  assert calls == [("train", k, 4, size // 4) for k in range(4)]
  assert next(batches)["inputs"][:, 0].tolist() == [k for k in range(4) for _ in range(size // 4)]
  # The default, 0: one shard per host's block of rows (here one process: one shard).
  default = stage_batches(make_dataset, _parse_config(), None, split="train",
                          sharding=sharding, workdir="")
  assert (default.num_shards, default.shards) == (1, [0])


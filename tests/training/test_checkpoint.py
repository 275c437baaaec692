"""Tests for training/checkpoint.py: round trips, keep-N, resharding, partial and safe restores,
damaged checkpoints and failed background saves."""

import errno
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
from orbax.checkpoint._src.path import atomicity
import pytest

from configs.run_layout import checkpoint_dir
from training.checkpoint import Checkpointer, CheckpointError


def _mesh(shape, names):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


def _abstract(tree, spec_fn):
  """ShapeDtypeStructs of `tree`'s leaves with shardings `spec_fn(leaf)`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec_fn(x)), tree)


def _params(scale=1.0):
  return {
      "dense": {"kernel": scale * jnp.arange(32, dtype=jnp.float32).reshape(8, 4) / 7,
                "bias": jnp.full((4,), 0.5 * scale, jnp.float32)},
      "embed": jnp.arange(16, dtype=jnp.bfloat16) * scale,
  }


def _train_state(params):
  """A state like the train loop's: params, adamw state after one update, step, raw RNG key."""
  tx = optax.adamw(1e-2, weight_decay=0.1)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.25, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return {
      "params": optax.apply_updates(params, updates),
      "opt_state": opt_state,
      "step": jnp.asarray(7, jnp.int32),
      "rng": jax.random.key_data(jax.random.PRNGKey(42)),
  }


def _assert_trees_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_round_trip_with_adamw_state_is_bit_identical(tmp_path):
  state = _train_state(_params())
  replicated = NamedSharding(_mesh((8,), ("x",)), P())
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
  assert ckpt.save(7, state)
  restored, data_state = ckpt.restore(None, _abstract(state, lambda _: replicated))
  ckpt.close()

  _assert_trees_identical(restored, state)
  assert data_state is None
  # The optax namedtuples come back as namedtuples, with the update's count and moments.
  adam = restored["opt_state"][0]
  assert type(adam).__name__ == "ScaleByAdamState"
  assert int(adam.count) == 1
  np.testing.assert_allclose(np.asarray(adam.mu["dense"]["bias"]), np.full(4, 0.025))
  assert restored["rng"].dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(restored["rng"]), [0, 42])
  assert int(restored["step"]) == 7


def test_save_only_when_due_or_forced(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every=5, async_save=False)
  state = {"w": jnp.ones(3)}
  assert [ckpt.save(s, state) for s in range(1, 11)] == [
      False, False, False, False, True, False, False, False, False, True]
  assert ckpt.save(12, state, force=True)
  assert not ckpt.save(12, state, force=True)  # already saved: a no-op, not an error
  assert ckpt.all_steps() == [5, 10, 12] and ckpt.latest_step() == 12
  ckpt.close()


def test_async_save_snapshots_the_state(tmp_path):
  # The train step donates the state right after `save`: the checkpoint must hold the values
  # at save time even if the device buffers are reused or freed before the write finishes.
  ckpt = Checkpointer(str(tmp_path), save_every=1)
  state = {"w": jnp.arange(4096, dtype=jnp.float32)}
  assert ckpt.save(1, state)
  donated = jax.jit(lambda s: {"w": s["w"] + 1}, donate_argnums=0)(state)
  state["w"].delete()
  abstract = _abstract(donated, lambda _: NamedSharding(_mesh((8,), ("x",)), P()))
  restored, _ = ckpt.restore(1, abstract)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4096, dtype=np.float32))
  ckpt.close()


def test_keeps_last_n(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, max_to_keep=2, save_every=1)
  for step in range(1, 5):
    assert ckpt.save(step, {"w": jnp.full((2,), step, jnp.float32)})
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(directory)) == ["3", "4"]
  ckpt.close()
  reopened = Checkpointer(directory, max_to_keep=2)
  assert reopened.all_steps() == [3, 4] and reopened.latest_step() == 4
  reopened.close()


def test_data_state_round_trip(tmp_path):
  data_state = {"next_index": 17, "epoch": 1, "worker_states": [{"pos": 3}, {"pos": 5}]}
  state = {"w": jnp.arange(4.0)}
  ckpt = Checkpointer(str(tmp_path), save_every=10)
  assert ckpt.save(10, state, data_state)
  assert ckpt.save(20, state)  # no data state this time
  ckpt.wait()
  assert sorted(os.listdir(tmp_path / "10")) == [
      "_CHECKPOINT_METADATA", "commit_success.txt", "data_0", "state"]
  target = _abstract(state, lambda _: NamedSharding(_mesh((8,), ("x",)), P()))
  restored, restored_data = ckpt.restore(10, target)
  assert restored_data == data_state
  np.testing.assert_array_equal(np.asarray(restored["w"]), [0.0, 1.0, 2.0, 3.0])
  assert ckpt.restore(20, target)[1] is None
  with pytest.raises(TypeError):
    ckpt.save(30, state, {"bad": object()})  # not JSON: fails in the caller, not async
  ckpt.close()


def test_restore_onto_different_meshes(tmp_path):
  mesh8 = _mesh((8,), ("x",))
  state = {
      "params": {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8),
                 "v": jnp.arange(16, dtype=jnp.int32)},
      "step": jnp.asarray(3, jnp.int32),
  }
  # Saved fully sharded: axis 0 of every array over the 8 devices.
  state = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh8, P("x") if x.ndim else P())), state)
  assert len(state["params"]["w"].addressable_shards) == 8
  ckpt = Checkpointer(str(tmp_path), save_every=3)
  assert ckpt.save(3, state)

  replicated = NamedSharding(mesh8, P())
  restored, _ = ckpt.restore(3, _abstract(state, lambda _: replicated))
  _assert_trees_identical(restored, state)
  assert all(x.sharding == replicated for x in jax.tree.leaves(restored))

  mesh24 = _mesh((2, 4), ("a", "b"))
  specs = {"params": {"w": P("a", "b"), "v": P("b")}, "step": P()}
  target = jax.tree.map(
      lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh24, spec)),
      state, specs)
  restored, _ = ckpt.restore(None, target)
  _assert_trees_identical(restored, state)
  assert restored["params"]["w"].sharding == NamedSharding(mesh24, P("a", "b"))
  assert restored["params"]["w"].addressable_shards[0].data.shape == (4, 2)
  assert restored["params"]["v"].addressable_shards[0].data.shape == (4,)
  ckpt.close()


def test_restore_params_by_path(tmp_path):
  workdir = str(tmp_path / "pretrain")
  ckpt = Checkpointer(checkpoint_dir(workdir), save_every=1)
  assert ckpt.save(1, _train_state(_params(1.0)))
  assert ckpt.save(2, _train_state(_params(2.0)))
  ckpt.close()

  sharding = NamedSharding(_mesh((8,), ("x",)), P())
  # Only params are asked for: the optimizer state of the next stage may look different.
  abstract = _abstract(_params(), lambda _: sharding)
  latest = _train_state(_params(2.0))["params"]
  _assert_trees_identical(Checkpointer.restore_params(workdir, abstract), latest)
  _assert_trees_identical(Checkpointer.restore_params(checkpoint_dir(workdir), abstract), latest)
  first = Checkpointer.restore_params(os.path.join(checkpoint_dir(workdir), "1"), abstract)
  _assert_trees_identical(first, _train_state(_params(1.0))["params"])
  assert first["dense"]["kernel"].sharding == sharding
  with pytest.raises(FileNotFoundError):
    Checkpointer.restore_params(str(tmp_path / "missing"), abstract)


def test_interrupted_saves_are_ignored(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(str(directory), save_every=1)
  assert ckpt.save(1, {"params": {"w": jnp.full((2,), 1.0)}})
  ckpt.close()
  # A crash mid-save leaves orbax's tmp directory (local disks) or a step directory without
  # its commit marker (object stores, where there is no atomic rename).
  tmp_dir = directory / "2.orbax-checkpoint-tmp-1700000000000000"
  (tmp_dir / "state").mkdir(parents=True)
  (tmp_dir / "state" / "manifest.ocdbt").write_text("partial")
  (directory / "3" / "state" / "ocdbt.process_0").mkdir(parents=True)
  (directory / "3" / "state" / "ocdbt.process_0" / "stale_shard").write_text("partial")

  ckpt = Checkpointer(str(directory), save_every=1)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  sharding = NamedSharding(_mesh((8,), ("x",)), P())
  abstract = {"params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=sharding)}}
  restored, _ = ckpt.restore(None, abstract)
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), [1.0, 1.0])
  params = Checkpointer.restore_params(str(tmp_path), abstract["params"])
  np.testing.assert_array_equal(np.asarray(params["w"]), [1.0, 1.0])
  with pytest.raises(FileNotFoundError):
    Checkpointer.restore_params(str(directory / "3"), abstract["params"])

  # Saving the interrupted step again replaces the stale files and clears the tmp directory.
  assert ckpt.save(3, {"params": {"w": jnp.full((2,), 3.0)}})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 3]
  assert sorted(os.listdir(directory)) == ["1", "3"]
  assert "stale_shard" not in os.listdir(directory / "3" / "state" / "ocdbt.process_0")
  restored, _ = ckpt.restore(3, abstract)
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), [3.0, 3.0])
  ckpt.close()


# --- Damaged checkpoints ------------------------------------------------------------------

def _truncate_arrays(step_dir):
  for root, _, files in os.walk(step_dir / "state" / "d"):
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)


def _remove(relative):
  return lambda step_dir: os.remove(step_dir / relative)


_DAMAGE = {
    "truncated array file": (_truncate_arrays, "state: ValueError"),
    "missing _METADATA": (_remove("state/_METADATA"), "state/_METADATA missing"),
    "missing manifest.ocdbt": (_remove("state/manifest.ocdbt"), "state/manifest.ocdbt missing"),
}


def _two_steps(directory, **options):
  """Steps 10 and 20 of `{"w": step}` with data states `{"at": step}`; a fresh Checkpointer."""
  ckpt = Checkpointer(str(directory), save_every=10)
  for step in (10, 20):
    assert ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"at": step})
  ckpt.close()
  return Checkpointer(str(directory), save_every=10, **options)


def _w_target():
  sharding = NamedSharding(_mesh((8,), ("x",)), P())
  return {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_latest_step_falls_back_to_the_older_one(tmp_path, caplog, damage):
  mutate, _ = _DAMAGE[damage]
  ckpt = _two_steps(tmp_path, fallback=True)
  mutate(tmp_path / "20")
  with caplog.at_level(logging.WARNING):
    resumed = ckpt.resume(_w_target())
  assert resumed.step == 10 and resumed.data_states == [{"at": 10}]
  np.testing.assert_array_equal(np.asarray(resumed.state["w"]), [10.0] * 4)
  messages = [record.getMessage() for record in caplog.records]
  skipped = [m for m in messages if "Skipping checkpoint step 20" in m]
  assert len(skipped) == 1 and str(tmp_path / "20") in skipped[0]
  # Moved aside, so the run saves step 20 again and the damaged files stay for inspection.
  assert ckpt.all_steps() == [10]
  assert [n for n in os.listdir(tmp_path) if n.startswith("20.unrestorable-")]
  assert ckpt.save(20, {"w": jnp.full((4,), 21.0)}, {"at": 21})
  state, data_state = ckpt.restore(None, _w_target())
  assert data_state == {"at": 21} and float(state["w"][0]) == 21.0
  ckpt.close()


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_latest_step_without_fallback_names_the_step(tmp_path, damage):
  mutate, cause = _DAMAGE[damage]
  ckpt = _two_steps(tmp_path, fallback=False)
  mutate(tmp_path / "20")
  for restore in (lambda: ckpt.restore(None, _w_target()), lambda: ckpt.resume(_w_target())):
    with pytest.raises(CheckpointError) as raised:
      restore()
    message = str(raised.value)
    assert message.startswith(f"checkpoint {tmp_path / '20'} cannot be restored: {cause}")
    assert "\n" not in message and raised.value.path == str(tmp_path / "20")
  assert ckpt.all_steps() == [10, 20]  # nothing moved without fallback
  ckpt.close()
  if damage != "truncated array file":  # found before reading: params-only restores too
    with pytest.raises(CheckpointError, match=cause):
      Checkpointer.restore_params(str(tmp_path), _w_target())


def test_every_step_damaged_is_an_error_even_with_fallback(tmp_path):
  ckpt = _two_steps(tmp_path, fallback=True)
  os.remove(tmp_path / "10" / "state" / "manifest.ocdbt")
  os.remove(tmp_path / "20" / "state" / "manifest.ocdbt")
  with pytest.raises(CheckpointError, match="no older step restores either"):
    ckpt.resume(_w_target())
  assert ckpt.all_steps() == [10, 20]
  ckpt.close()


def _corrupt_data(step_dir):
  for name in os.listdir(step_dir / "data_0"):
    (step_dir / "data_0" / name).write_text("{not json")


_DATA_DAMAGE = {"missing": lambda d: shutil.rmtree(d / "data_0"), "corrupt": _corrupt_data}


@pytest.mark.parametrize("damage", sorted(_DATA_DAMAGE))
def test_damaged_data_state_is_an_error_naming_the_step(tmp_path, damage):
  ckpt = _two_steps(tmp_path, fallback=False)
  _DATA_DAMAGE[damage](tmp_path / "20")
  for restore in (lambda: ckpt.resume(_w_target()), lambda: ckpt.restore(20, _w_target()),
                  lambda: ckpt.restore_data_states(20)):
    with pytest.raises(CheckpointError,
                       match=rf"^checkpoint {tmp_path / '20'} cannot be restored: data iterator"):
      restore()
  ckpt.close()


@pytest.mark.parametrize("damage", sorted(_DATA_DAMAGE))
def test_damaged_data_state_falls_back_or_starts_a_fresh_iterator(tmp_path, damage):
  ckpt = _two_steps(tmp_path, fallback=True)
  _DATA_DAMAGE[damage](tmp_path / "20")
  resumed = ckpt.resume(_w_target())  # the older step has the data order: exact resume
  assert resumed.step == 10 and resumed.data_states == [{"at": 10}]
  ckpt.close()

  ckpt = _two_steps(tmp_path / "fresh", fallback=True, fresh_data_iterator=True)
  _DATA_DAMAGE[damage](tmp_path / "fresh" / "20")
  resumed = ckpt.resume(_w_target())  # opted in: the newest state, a fresh iterator
  assert resumed.step == 20 and resumed.data_states is None
  assert float(resumed.state["w"][0]) == 20.0
  assert ckpt.restore(20, _w_target())[1] is None and ckpt.restore_data_states(20) == []
  ckpt.close()


def test_resume_without_saved_data_state(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every=1, fresh_data_iterator=False)
  assert ckpt.save(1, {"w": jnp.ones(4)})  # e.g. the RL loop saves no data state
  resumed = ckpt.resume(_w_target())
  assert resumed.step == 1 and resumed.data_states is None
  ckpt.close()


# --- Failed background saves ----------------------------------------------------------------

@pytest.mark.parametrize("surface", ["check", "save"])
def test_failed_async_save_surfaces_at_the_next_step_boundary(tmp_path, monkeypatch, surface):
  # max_to_keep=1: orbax alone would prune step 1 when step 2's save ends, failed or not.
  ckpt = Checkpointer(str(tmp_path), save_every=1, max_to_keep=1)
  assert ckpt.save(1, {"w": jnp.full((4,), 1.0)}, {"at": 1})
  ckpt.wait()

  async def disk_full(self):
    raise OSError(errno.ENOSPC, "No space left on device", str(self.get_final()))

  # The final write of the save (commit marker, rename) fails as on a full disk, in the
  # background thread; which class does it depends on the filesystem.
  for temporary_path in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    monkeypatch.setattr(temporary_path, "finalize", disk_full)
  assert ckpt.save(2, {"w": jnp.full((4,), 2.0)}, {"at": 2})  # returns: the write is async
  with pytest.raises(CheckpointError) as raised:
    if surface == "check":
      for _ in range(1000):  # the loop's steps, each calling check() until the save ends
        ckpt.check()
        time.sleep(0.01)
    else:
      ckpt.save(3, {"w": jnp.full((4,), 3.0)}, {"at": 3})
  monkeypatch.undo()
  message = str(raised.value)
  assert message.startswith(f"checkpoint save of step 2 to {tmp_path / '2'} failed: OSError: ")
  assert "No space left on device" in message and "latest good checkpoint is step 1" in message
  assert "\n" not in message
  ckpt.check()  # raised once: the loop's shutdown (wait, close) adds no second error
  ckpt.close()

  reopened = Checkpointer(str(tmp_path), save_every=1)
  assert reopened.all_steps() == [1]
  resumed = reopened.resume(_w_target())
  assert resumed.step == 1 and resumed.data_states == [{"at": 1}]
  np.testing.assert_array_equal(np.asarray(resumed.state["w"]), [1.0] * 4)
  reopened.close()

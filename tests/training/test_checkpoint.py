"""Tests for training/checkpoint.py: round trips, keep-N, resharding, partial and safe restores."""

import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from training.checkpoint import Checkpointer, checkpoint_dir


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

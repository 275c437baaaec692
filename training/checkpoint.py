"""Checkpoints: a thin wrapper over orbax's `CheckpointManager` (async saves, keep the last N).

Layout of a run's checkpoints (`checkpoint_dir(workdir)`):

    {workdir}/checkpoints/{step}/
        state/               train state pytree (params, opt_state, step, rng, ...), OCDBT
        data_{process}/      data iterator state of JAX process `process` (JSON), if given
        commit_success.txt   written last, just before the step directory becomes visible
        _CHECKPOINT_METADATA

Failure safety: orbax writes a save into `{step}.orbax-checkpoint-tmp-{timestamp}/` and renames
it to `{step}/` only when every file (and `commit_success.txt`) is written, so a run that dies
mid-save leaves the last good checkpoint untouched; leftover tmp directories are ignored and
deleted by the next save. On object stores (GCS) there is no atomic rename: the step directory is
written in place and only `commit_success.txt` marks it complete. This module requires that
marker on every filesystem, so a step directory left without it (a crash mid-write on GCS, a
half-finished manual copy) is never taken for the latest checkpoint; saving that step again
replaces it (orbax's manager always saves with `force`, deleting what is at the step's path).

The train state may hold optax states: orbax saves namedtuples (e.g. `ScaleByAdamState`) as
their fields and `restore` rebuilds them from the structure of `abstract_state`, so the state
goes in and comes out as is. RNG keys may be raw `uint32` key data or typed key arrays.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_STATE_ITEM = "state"
_COMMIT_MARKER = "commit_success.txt"


def checkpoint_dir(workdir: str) -> str:
  """Returns where a run in `workdir` keeps its checkpoints: `{workdir}/checkpoints`."""
  return os.path.join(workdir, "checkpoints")


def _data_item(process_index: int) -> str:
  return f"data_{process_index}"


def _absolute(directory: str) -> epath.Path:
  # Orbax rejects relative paths; remote paths (gs://...) are absolute already.
  if "://" not in str(directory):
    directory = os.path.abspath(directory)
  return epath.Path(directory)


def _step_name_format() -> ocp.step.NameFormat:
  # Steps are found through the commit-file check on every filesystem, not only on GCS: a
  # step directory without its marker is an interrupted write, never a checkpoint.
  return ocp.step.standard_name_format(
      temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath)


def _finalized_steps(directory: epath.Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(m.step for m in _step_name_format().find_all(directory))


def _gather_data_states(data_state: dict | None) -> list[dict | None]:
  """Returns every process's data state, indexed by process (a collective on multi-host).

  Orbax's JSON handler writes on the primary process only, so per-host iterator states have to
  reach that process first. Encoding here also makes a non-JSON state fail in the caller's
  thread rather than later inside the async save.
  """
  payload = json.dumps(data_state, sort_keys=True).encode()
  if jax.process_count() == 1:
    return [json.loads(payload)]
  lengths = multihost_utils.process_allgather(np.array([len(payload)], np.int32))
  lengths = np.asarray(lengths).reshape(-1)
  buffer = np.zeros(int(lengths.max()), np.uint8)
  buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
  buffers = np.asarray(multihost_utils.process_allgather(buffer))
  return [json.loads(bytes(buffers[i, :n])) for i, n in enumerate(lengths)]


def _resolve_step_dir(path: str) -> epath.Path:
  """Finds the step directory meant by a workdir, a checkpoints directory or a step directory."""
  root = _absolute(path)
  if (root / _STATE_ITEM).is_dir():
    if not (root / _COMMIT_MARKER).exists():
      raise FileNotFoundError(f"{root} is an incomplete checkpoint (no {_COMMIT_MARKER}).")
    return root
  if (root / "checkpoints").is_dir():
    root = root / "checkpoints"
  steps = _finalized_steps(root)
  if not steps:
    raise FileNotFoundError(f"No complete checkpoint under {path}.")
  return root / str(steps[-1])


class Checkpointer:
  """Saves and restores the train state and data iterator state of one run.

  Every process calls every method (saves and restores are collective); only the primary
  process writes the small files. Saves are asynchronous: `save` returns once the arrays are
  copied off the devices, so the caller may donate or overwrite the state straight away, and
  the files are written in a background thread. Call `wait()` before reading the files from
  elsewhere and `close()` at the end of the run.

  Example:

      ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=3, save_every=500)
      if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(None, abstract_state)
      ...
      ckpt.save(step, state, iterator.get_state())
      ...
      ckpt.save(step, state, iterator.get_state(), force=True)
      ckpt.close()
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 500,
               async_save: bool = True):
    """Opens (creating if missing) a checkpoint directory.

    Args:
      directory: the checkpoints directory, normally `checkpoint_dir(workdir)`.
      max_to_keep: complete checkpoints to keep; older ones are deleted after each save.
      save_every: `save` writes when `step % save_every == 0` (or when forced); 0 or less
        saves only when forced.
      async_save: write files in a background thread instead of blocking `save`.
    """
    self.directory = _absolute(directory)
    self.save_every = save_every
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # `save` decides itself (and passes force=True), so orbax's interval policy is unused.
        save_interval_steps=1,
        step_name_format=_step_name_format(),
        # Tmp directories of saves that never finished are garbage; orbax deletes them on save.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """Returns the newest complete (or in-flight) checkpoint step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Returns the steps of all kept checkpoints (including a save in flight), ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, data_state: dict | None = None, *,
           force: bool = False) -> bool:
    """Saves `state` and this process's `data_state` at `step` if it is due.

    Args:
      step: the number of optimizer steps `state` has taken.
      state: pytree of (possibly sharded, multi-process) jax.Arrays, numpy arrays and scalars.
      data_state: this process's JSON-serialisable data iterator state (may differ per
        process; `restore` hands each process its own back), or None.
      force: save even if `step` is not a multiple of `save_every` (end of run, preemption).

    Returns:
      Whether a checkpoint was started. False if not due or `step` is already saved.
    """
    due = self.save_every > 0 and step % self.save_every == 0
    if not (due or force):
      return False
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d exists; not saving it again.", step)
      return False
    items = {_STATE_ITEM: ocp.args.StandardSave(state)}
    for index, process_state in enumerate(_gather_data_states(data_state)):
      if process_state is not None:
        items[_data_item(index)] = ocp.args.JsonSave(process_state)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("Saving checkpoint for step %d to %s.", step, self.directory)
    return bool(saved)

  def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, dict | None]:
    """Restores a checkpoint onto the shardings of `abstract_state`.

    Args:
      step: the step to restore; None for the latest.
      abstract_state: pytree with the saved structure whose leaves are `jax.ShapeDtypeStruct`s
        with `.sharding` set; the mesh may differ from the one at save time (arrays are
        resharded while reading) and dtypes are cast to the given ones.

    Returns:
      `(state, data_state)`: the state with `abstract_state`'s structure and shardings, and
      this process's data iterator state (None if none was saved for this process).

    Raises:
      FileNotFoundError: there is no checkpoint (at `step`).
    """
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}.")
    items = {_STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    data_item = _data_item(jax.process_index())
    step_dir = self.directory / str(step)
    if (step_dir / data_item).exists():
      items[data_item] = ocp.args.JsonRestore()
    elif (step_dir / _data_item(0)).exists():
      logging.warning("Checkpoint %s has no data state for process %d (saved with fewer "
                      "processes?); the data iterator starts afresh.", step_dir,
                      jax.process_index())
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint for step %d from %s.", step, self.directory)
    return restored[_STATE_ITEM], restored.get(data_item)

  def restore_data_states(self, step: int) -> list[dict]:
    """Every process's saved data iterator state at `step`, by process index.

    A run resumed on a different number of processes merges these (each process's state names
    the data shards it read) instead of taking only its own.
    """
    self.wait()
    step_dir = self.directory / str(step)
    names = sorted((p.name for p in step_dir.iterdir() if p.name.startswith("data_")),
                   key=lambda name: int(name.split("_")[1]))
    if not names:
      return []
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore() for name in names}))
    return [restored[name] for name in names]

  @staticmethod
  def restore_params(path: str, abstract_params: PyTree, fresh_params: PyTree | None = None
                     ) -> PyTree:
    """Restores only the `params` subtree of a checkpoint, e.g. an earlier stage's.

    The optimizer state and everything else in the checkpoint are not read, so they need not
    match the current stage; saved params that `abstract_params` lacks are ignored (a reward
    model drops a decoder's LM head).

    Args:
      path: a workdir (its latest checkpoint), a checkpoints directory (its latest step) or a
        single step directory.
      abstract_params: pytree of `jax.ShapeDtypeStruct` with `.sharding` set, matching the
        saved `state["params"]`.
      fresh_params: params (same structure) to take the leaves the checkpoint does not have
        from, e.g. a new reward head on a pretrained decoder; without it a missing leaf is an
        error.

    Returns:
      The params with `abstract_params`'s structure, dtypes and shardings.

    Raises:
      KeyError: the checkpoint lacks params of `abstract_params` and no `fresh_params`.
    """
    step_dir = _resolve_step_dir(path)
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(step_dir / _STATE_ITEM, args=args)
    logging.info("Restored params from %s.", step_dir)
    # Orbax hands back the abstract leaf for a param the checkpoint does not have.
    missing = lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct)
    names = [jax.tree_util.keystr(p) for p, leaf in
             jax.tree_util.tree_leaves_with_path(restored["params"]) if missing(leaf)]
    if not names:
      return restored["params"]
    if fresh_params is None:
      raise KeyError(f"{step_dir} has no params {names}")
    logging.info("Params not in %s keep their fresh values: %s", step_dir, names)
    return jax.tree.map(lambda r, f: f if missing(r) else r, restored["params"], fresh_params)

  def wait(self) -> None:
    """Blocks until all started saves are written (and old checkpoints pruned)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

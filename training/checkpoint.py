"""Checkpoints: a thin wrapper over orbax's `CheckpointManager` (async saves, keep the last N).

Layout of a run's checkpoints (configs/run_layout.py `checkpoint_dir(workdir)`; the step
directory's files and what makes one unrestorable: training/checkpoint_files.py):

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

A step directory that is complete but damaged (a truncated array file, a lost `state/_METADATA`
or `manifest.ocdbt`, an unreadable `data_{process}/`) raises `CheckpointError` naming the step
directory and what is wrong. With `fallback` the newest step that restores is used instead; the
skipped ones are logged and moved aside to `{step}.unrestorable-{time}` (kept for inspection,
out of the way of the step's next save). A save that fails in the background (disk full) raises
`CheckpointError` at the next `check`, `save` or `wait`; old checkpoints are pruned only after a
newer one is committed, so the last good checkpoint survives a failed save.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from training.checkpoint_files import (STATE_ITEM, CheckpointError, absolute_path,
                                       check_state_files, data_item, finalized_steps,
                                       gather_data_states, one_line, restore_params,
                                       saved_items, step_name_format, unrestorable)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Resumed:
  """What `Checkpointer.resume` restored: the step it came from, the train state, and every
  process's data iterator state by process index (None: the iterator starts afresh)."""
  step: int
  state: PyTree
  data_states: list[dict] | None


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, keeping the error of a failed background save.

  Orbax only logs that error (its finalize step catches it) and the run would go on without
  checkpoints; `Checkpointer` raises it at the next step boundary instead.
  """
  save_error: BaseException | None = None

  def check_for_errors(self):
    try:
      super().check_for_errors()
    except Exception as e:  # any failure of the background write: kept, then re-raised
      self.save_error = e
      raise


class Checkpointer:
  """Saves and restores the train state and data iterator state of one run.

  Every process calls every method except `check` (saves and restores are collective); only
  the primary process writes the small files. Saves are asynchronous: `save` returns once the
  arrays are copied off the devices, so the caller may donate or overwrite the state straight
  away, and the files are written in a background thread. Call `check()` once per step (it
  reads a flag: no device sync, no file access) to stop at the first step boundary after a
  save failed, `wait()` before reading the files from elsewhere and `close()` at the end.

  Example:

      ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=3, save_every=500)
      if ckpt.latest_step() is not None:
        resumed = ckpt.resume(abstract_state)
        state, data_states = resumed.state, resumed.data_states
      ...
      ckpt.check()
      ckpt.save(step, state, iterator.get_state())
      ...
      ckpt.save(step, state, iterator.get_state(), force=True)
      ckpt.close()
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 500,
               async_save: bool = True, fallback: bool = True,
               fresh_data_iterator: bool = False):
    """Opens (creating if missing) a checkpoint directory.

    Args:
      directory: the checkpoints directory, normally `checkpoint_dir(workdir)`.
      max_to_keep: complete checkpoints to keep; older ones are deleted once a newer save is
        committed (never because of a save that failed).
      save_every: `save` writes when `step % save_every == 0` (or when forced); 0 or less
        saves only when forced.
      async_save: write files in a background thread instead of blocking `save`.
      fallback: restoring the latest step (`restore(None, ...)`, `resume`) falls back to the
        newest step that restores when newer ones are damaged, logging each skipped step and
        why; when False the first `CheckpointError` is raised.
      fresh_data_iterator: a missing or unreadable data iterator state is not an error: the
        state is restored and the data iterator starts afresh (a different data order).
    """
    self.directory = absolute_path(directory)
    self.save_every = save_every
    self.max_to_keep = max_to_keep
    self.fallback = fallback
    self.fresh_data_iterator = fresh_data_iterator
    self._pending_step: int | None = None
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        # Pruned here, after the newer save is committed: orbax prunes when a save finishes
        # even if it failed, which with max_to_keep=1 deletes the only good checkpoint.
        max_to_keep=None,
        # `save` decides itself (and passes force=True), so orbax's interval policy is unused.
        save_interval_steps=1,
        step_name_format=step_name_format(),
        # Tmp directories of saves that never finished are garbage; orbax deletes them on save.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = _Manager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """Returns the newest complete (or in-flight) checkpoint step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Returns the steps of all kept checkpoints (including a save in flight), ascending."""
    return sorted(self._manager.all_steps())

  def check(self) -> None:
    """Raises the failure of a background save, if one failed; cheap enough for every step.

    Looks at the save in flight only once it has finished (a flag, no device sync); on
    multi-host runs the other processes learn of a failure at the next `save` or `wait`.

    Raises:
      CheckpointError: naming the step and the cause, e.g. `checkpoint save of step 20 to
        /w/checkpoints/20 failed: OSError: [Errno 28] No space left on device`.
    """
    if self._pending_step is not None and not self._manager.is_saving_in_progress():
      self._collect_save_error()
    if self._manager.save_error is not None:
      self._raise_save_failure()

  def _collect_save_error(self) -> None:
    """Waits for the save in flight and keeps its error in `save_error`, however orbax
    reports it (raised by the join, or stored for `check_for_errors`)."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # any failure of the background write, raised with its step later
      if self._manager.save_error is None:
        self._manager.save_error = e

  def _raise_save_failure(self) -> None:
    error, step = self._manager.save_error, self._pending_step
    self._manager.save_error, self._pending_step = None, None
    # The failed step directory has no commit marker: re-listing drops it from the steps.
    self._manager.reload()
    path = self.directory / str(step)
    message = (f"checkpoint save of step {step} to {path} failed: {one_line(error)}; "
               f"the latest good checkpoint is step {self.latest_step()}")
    logging.error("%s", message)
    raise CheckpointError(path, message) from error

  def _settle(self) -> None:
    """Waits for the save in flight, raises its failure, prunes old checkpoints (collective)."""
    self._collect_save_error()
    failed = self._manager.save_error is not None
    if jax.process_count() > 1:
      failed = bool(np.asarray(multihost_utils.process_allgather(np.int32(failed))).any())
      if failed and self._manager.save_error is None:
        self._manager.save_error = RuntimeError("the save failed on another process")
    if failed:
      self._raise_save_failure()
    self._pending_step = None
    if self.max_to_keep > 0:
      for step in finalized_steps(self.directory)[:-self.max_to_keep]:
        if step in self._manager.all_steps():
          self._manager.delete(step)

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

    Raises:
      CheckpointError: the previous (background) save failed; nothing is saved.
    """
    due = self.save_every > 0 and step % self.save_every == 0
    if not (due or force):
      return False
    self._settle()
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d exists; not saving it again.", step)
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    for index, process_state in enumerate(gather_data_states(data_state)):
      if process_state is not None:
        items[data_item(index)] = ocp.args.JsonSave(process_state)
    self._pending_step = step
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("Saving checkpoint for step %d to %s.", step, self.directory)
    return bool(saved)

  def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, dict | None]:
    """Restores a checkpoint onto the shardings of `abstract_state`.

    Args:
      step: the step to restore; None for the latest (or, with `fallback`, the newest that
        restores).
      abstract_state: pytree with the saved structure whose leaves are `jax.ShapeDtypeStruct`s
        with `.sharding` set; the mesh may differ from the one at save time (arrays are
        resharded while reading) and dtypes are cast to the given ones.

    Returns:
      `(state, data_state)`: the state with `abstract_state`'s structure and shardings, and
      this process's data iterator state (None if none was saved for this process, or it is
      unusable and `fresh_data_iterator` allows that).

    Raises:
      FileNotFoundError: there is no checkpoint (at `step`).
      CheckpointError: the step (with `fallback`: every step) cannot be restored.
    """
    self.wait()
    if step is not None:
      if step not in self._manager.all_steps():
        raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}.")
      return self._restore_step(step, abstract_state, all_data=False)
    return self._restore_newest(abstract_state, all_data=False)[1:]

  def resume(self, abstract_state: PyTree) -> Resumed:
    """Restores the latest checkpoint (with `fallback`: the newest that restores) and every
    process's data iterator state from that same step, for a run that carries on.

    A step saved without any data state resumes with `data_states` None, as does one whose
    data state is missing or unreadable when `fresh_data_iterator` allows it.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CheckpointError: no step can be restored (without `fallback`: the latest cannot).
    """
    self.wait()
    step, state, data_states = self._restore_newest(abstract_state, all_data=True)
    return Resumed(step, state, data_states)

  def restore_data_states(self, step: int) -> list[dict]:
    """Every process's saved data iterator state at `step`, by process index.

    A run resumed on a different number of processes merges these (each process's state names
    the data shards it read) instead of taking only its own.

    Raises:
      CheckpointError: a saved data state is missing or unreadable (unless
        `fresh_data_iterator`: then the result is empty).
    """
    self.wait()
    return self._restore_data(self.directory / str(step), all_data=True) or []

  def _restore_newest(self, abstract_state: PyTree, all_data: bool
                      ) -> tuple[int, PyTree, Any]:
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    skipped: list[int] = []
    errors: list[CheckpointError] = []
    for step in steps:
      try:
        state, data = self._restore_step(step, abstract_state, all_data)
      except CheckpointError as e:
        if not self.fallback:
          raise
        logging.warning("Skipping checkpoint step %d: %s", step, e)
        skipped.append(step)
        errors.append(e)
        continue
      if skipped:
        logging.warning("Restored step %d instead of %s (checkpoint.fallback).", step, skipped)
        self._set_aside(skipped)
      return step, state, data
    raise CheckpointError(errors[0].path, f"{errors[0]}; no older step restores either "
                          f"(steps {steps} all fail)")

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged steps so that the run saves those steps again and they do not count
    towards `max_to_keep`; the files stay for inspection."""
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        target = self.directory / f"{step}.unrestorable-{stamp}"
        (self.directory / str(step)).rename(target)
        logging.warning("Moved unrestorable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint_set_aside")
    self._manager.reload()

  def _restore_step(self, step: int, abstract_state: PyTree, all_data: bool
                    ) -> tuple[PyTree, Any]:
    """Restores one step; any damage is a `CheckpointError` naming the step directory.

    `all_data`: every process's data states (a list) instead of this process's (or None).
    """
    step_dir = self.directory / str(step)
    check_state_files(step_dir)
    ok, error = True, None
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(
              abstract_state)}))
    except (ValueError, OSError, KeyError, TypeError) as e:  # tensorstore / orbax read errors
      ok, error = False, e
    if jax.process_count() > 1:
      # Every process must pick the same step, even if a read failed on one of them only.
      ok = bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())
    if not ok:
      cause = one_line(error) if error is not None else "failed on another process"
      raise unrestorable(step_dir, f"{STATE_ITEM}: {cause}") from error
    data = self._restore_data(step_dir, all_data)
    logging.info("Restored checkpoint for step %d from %s.", step, self.directory)
    return restored[STATE_ITEM], data

  def _restore_data(self, step_dir: epath.Path, all_data: bool) -> Any:
    """This process's data state (or every process's, a list) saved in `step_dir`.

    Raises `CheckpointError` for a data state the save wrote that is now missing or
    unreadable, unless `fresh_data_iterator`: then None, with a warning.
    """
    saved = sorted((name for name in saved_items(step_dir) if name.startswith("data_")),
                   key=lambda name: int(name.split("_")[1]))
    names = saved if all_data else [n for n in saved if n == data_item(jax.process_index())]
    if not all_data and saved and not names:
      logging.warning("Checkpoint %s has no data state for process %d (saved with fewer "
                      "processes?); the data iterator starts afresh.", step_dir,
                      jax.process_index())
    if not names:
      return None
    try:
      missing = [name for name in names if not (step_dir / name).is_dir()]
      if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing")
      restored = self._manager.restore(
          int(step_dir.name),
          args=ocp.args.Composite(**{name: ocp.args.JsonRestore() for name in names}))
      states = [restored[name] for name in names]
      if any(not isinstance(s, dict) for s in states):
        raise ValueError("not a JSON object")
    except (ValueError, OSError, KeyError, TypeError) as e:
      problem = f"data iterator state: {one_line(e)}"
      if not self.fresh_data_iterator:
        raise unrestorable(step_dir, f"{problem} (set checkpoint.fresh_data_iterator=True "
                                      "to resume with a fresh data iterator)") from e
      logging.warning("Checkpoint %s: %s; the data iterator starts afresh "
                      "(checkpoint.fresh_data_iterator).", step_dir, problem)
      return None
    return states if all_data else states[0]

  # Reading one checkpoint's params needs no manager (training/checkpoint_files.py).
  restore_params = staticmethod(restore_params)

  def wait(self) -> None:
    """Blocks until all started saves are written (and old checkpoints pruned).

    Raises:
      CheckpointError: a save failed (see `check`).
    """
    self._settle()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources.

    Raises:
      CheckpointError: the last save failed (the resources are released all the same).
    """
    try:
      self._settle()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

"""The files of a checkpoint step: its layout, how to find complete steps, and what makes one
unrestorable (training/checkpoint.py's `Checkpointer` reads and writes them through orbax).

    {workdir}/checkpoints/{step}/        (configs/run_layout.py `checkpoint_dir`)
        state/               train state pytree, OCDBT: `_METADATA`, `manifest.ocdbt`, arrays
        data_{process}/      data iterator state of JAX process `process` (JSON), if given
        commit_success.txt   written last, just before the step directory becomes visible
        _CHECKPOINT_METADATA the items the save wrote

A step directory without `commit_success.txt` is an interrupted write, never a checkpoint.
A complete one whose state files are missing raises `CheckpointError`, one line naming the step
directory and the cause. Also here, as they need no checkpoint manager: `restore_params` (the
params of any run's checkpoint) and `gather_data_states` (every process's data-iterator state
for the primary process to write).
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

from configs.run_layout import CHECKPOINTS_DIR


STATE_ITEM = "state"
COMMIT_MARKER = "commit_success.txt"
# Written by every save of the state item (OCDBT); a step without them cannot be restored.
STATE_FILES = ("_METADATA", "manifest.ocdbt")
STEP_METADATA = "_CHECKPOINT_METADATA"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored, or a save that failed; the message is one line
  naming the step directory and the cause."""

  def __init__(self, path: epath.Path | str, message: str):
    super().__init__(message)
    self.path = str(path)


def unrestorable(path: epath.Path, problem: str) -> CheckpointError:
  return CheckpointError(path, f"checkpoint {path} cannot be restored: {problem}")


def one_line(error: BaseException) -> str:
  """`Type: first line of the message`, short: tensorstore errors carry whole JSON specs."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text if len(text) <= 240 else text[:240] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def saved_items(step_dir: epath.Path) -> set[str]:
  """The items a step's save wrote, from its metadata; what is on disk if that is unreadable."""
  try:
    return set(json.loads((step_dir / STEP_METADATA).read_text())["item_handlers"])
  except (OSError, ValueError, KeyError, TypeError):
    return {p.name for p in step_dir.iterdir() if p.is_dir()}


def check_state_files(step_dir: epath.Path) -> None:
  # Orbax restores some of these cases anyway or fails with a tensorstore error naming only
  # an array: checking first gives one clear cause.
  missing = [f"{STATE_ITEM}/{name}" for name in STATE_FILES
             if not (step_dir / STATE_ITEM / name).exists()]
  if missing:
    raise unrestorable(step_dir, f"{', '.join(missing)} missing")


def data_item(process_index: int) -> str:
  return f"data_{process_index}"


def absolute_path(directory: str) -> epath.Path:
  # Orbax rejects relative paths; remote paths (gs://...) are absolute already.
  if "://" not in str(directory):
    directory = os.path.abspath(directory)
  return epath.Path(directory)


def step_name_format() -> ocp.step.NameFormat:
  # Steps are found through the commit-file check on every filesystem, not only on GCS: a
  # step directory without its marker is an interrupted write, never a checkpoint.
  return ocp.step.standard_name_format(
      temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath)


def finalized_steps(directory: epath.Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(m.step for m in step_name_format().find_all(directory))


def resolve_step_dir(path: str) -> epath.Path:
  """Finds the step directory meant by a workdir, a checkpoints directory or a step directory."""
  root = absolute_path(path)
  if (root / STATE_ITEM).is_dir():
    if not (root / COMMIT_MARKER).exists():
      raise FileNotFoundError(f"{root} is an incomplete checkpoint (no {COMMIT_MARKER}).")
    check_state_files(root)
    return root
  if (root / CHECKPOINTS_DIR).is_dir():  # a workdir
    root = root / CHECKPOINTS_DIR
  steps = finalized_steps(root)
  if not steps:
    raise FileNotFoundError(f"No complete checkpoint under {path}.")
  check_state_files(root / str(steps[-1]))
  return root / str(steps[-1])


def gather_data_states(data_state: dict | None) -> list[dict | None]:
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


def restore_params(path: str, abstract_params: Any, fresh_params: Any = None) -> Any:
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
    CheckpointError: the (latest) step's files are damaged; no fallback here, the caller
      named this checkpoint.
  """
  step_dir = resolve_step_dir(path)
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(step_dir / STATE_ITEM, args=args)
  except (ValueError, OSError) as e:  # tensorstore read errors name only an array
    raise unrestorable(step_dir, f"{STATE_ITEM}: {one_line(e)}") from e
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

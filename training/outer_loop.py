"""The outer loop every training loop shares: steps, logging windows, evaluation, checkpoints.

    for step in start+1 .. end:
        carry, result = step_fn(carry, step)                 one optimizer step / RL iteration
        window += result                                      (sum, weight) pairs: exact means
        save(step, carry)                                     every `checkpoint.every_steps`
        at log steps: train/* and perf/* = window means, perf/tokens_per_sec, perf/mfu
        at eval steps: evaluate(carry) -> eval/* (its time is not counted as training time)
        write the record (metrics.jsonl, TensorBoard), print the progress line
    save(end, carry, force=True)

The supervised loop (training/loop.py: one step = one batch) and the RL loop (training/rl/
loop.py: one step = one sample -> score -> update iteration) differ only in `step_fn`,
`evaluate` and what a checkpoint holds. `stop_after` ends the process at that step with a
checkpoint, as a preemption would, without changing the schedule.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from configs.run_layout import (append_config_history, checkpoint_dir, config_changes,
                                format_changes, has_run_config, read_run_config)

from objectives.reductions import Metrics, add_metrics, finalize_metrics
from training.checkpoint import Checkpointer
from training.eta import Countdown
from training.metrics import MetricsWriter
from training.preemption import Preempted, PreemptionWatch
from training.workdir_lock import WorkdirLock



@dataclasses.dataclass(frozen=True)
class StepResult:
  """What one step reports: `metrics` as device (sum, weight) pairs (the train step's),
  `figures` as host floats (an RL iteration's), both logged as train/* means over the log
  window; `perf` host floats logged as perf/* means; `tokens` real tokens trained on."""
  metrics: Metrics | None = None
  figures: dict[str, float] | None = None
  perf: dict[str, float] | None = None
  tokens: int = 0


StepFn = Callable[[Any, int], tuple[Any, StepResult]]


NONFINITE_MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
  """A step's loss or gradient norm was not finite (see `NonFiniteGuard`)."""


class NonFiniteGuard:
  """Watches the steps' `nonfinite` flags (training/step.py; with 'skip' it also drops such a
  step's update, so the params stay finite and the run can go on).

  The flags stay on the device until `check()`, which the loop calls only where it reads the
  device anyway (log steps, checkpoint steps, the end): no extra sync per step.
  """

  def __init__(self, mode: str, max_skips: int):
    if mode not in NONFINITE_MODES:
      raise ValueError(f"config.train.nonfinite: unknown {mode!r} ({' | '.join(NONFINITE_MODES)})")
    self.mode, self.max_skips = mode, max_skips
    self.pending: list[tuple[int, Any]] = []
    self.in_a_row = 0
    self.skipped = 0

  def add(self, step: int, result: StepResult) -> None:
    if result.metrics is not None and "nonfinite" in result.metrics:
      self.pending.append((step, result.metrics["nonfinite"][0]))
    elif result.figures and "nonfinite" in result.figures:
      self.pending.append((step, result.figures["nonfinite"]))

  def check(self) -> None:
    """Raises NonFiniteError if a pending step diverged ('stop') or too many did in a row."""
    pending, self.pending = self.pending, []
    bad = []
    for step, flag in pending:
      if float(flag) == 0:
        self.in_a_row = 0
        continue
      bad.append(step)
      self.in_a_row += 1
      self.skipped += 1
      if self.mode == "stop":
        raise NonFiniteError(
            f"step {step}: the loss or gradient norm is not finite; the run stops "
            "(config.train.nonfinite='stop'; 'skip' drops such steps and goes on). No "
            "checkpoint was saved from this step on: the earlier ones are intact.")
      if self.in_a_row > self.max_skips:
        raise NonFiniteError(
            f"step {step}: {self.in_a_row} steps in a row with a non-finite loss or gradient "
            f"norm (config.train.max_nonfinite_skips={self.max_skips}); the run stops. No "
            "checkpoint was saved after them: the earlier ones are intact.")
    if bad:
      logging.warning("dropped the non-finite updates of steps %s (%d so far in this process)",
                      bad, self.skipped)


class _Window:
  """The steps since the last log line: exact means of everything they reported."""

  def __init__(self):
    self.metrics, self.tokens, self.count = None, 0, 0
    self.figures: dict[str, list[float]] = {}

  def add(self, result: StepResult, count_tokens: bool) -> None:
    if result.metrics is not None:
      self.metrics = (result.metrics if self.metrics is None
                      else add_metrics(self.metrics, result.metrics))
    for prefix, values in (("train", result.figures), ("perf", result.perf)):
      for k, v in (values or {}).items():
        self.figures.setdefault(f"{prefix}/{k}", []).append(float(v))
    if count_tokens:
      self.tokens += result.tokens

  def record(self) -> dict[str, float]:
    record = {}
    if self.metrics is not None:
      record = {f"train/{k}": float(v) for k, v in finalize_metrics(self.metrics).items()}
    record.update({k: sum(v) / len(v) for k, v in self.figures.items()})
    return record


def open_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> Checkpointer:
  """The run's checkpoint manager, as `config.checkpoint` says."""
  return Checkpointer(checkpoint_dir(workdir),
                      max_to_keep=config.checkpoint.max_to_keep,
                      save_every=config.checkpoint.every_steps,
                      async_save=config.checkpoint.async_save,
                      fallback=config.checkpoint.fallback,
                      fresh_data_iterator=config.checkpoint.fresh_data_iterator)


class ConfigChangeError(ValueError):
  """A run was resumed with a config that changes fields fixed for its life."""


def _resume_changes(config: ml_collections.ConfigDict, workdir: str, model_kind: str
                    ) -> dict[str, tuple[Any, Any]]:
  """The allowed changes from the workdir's config.json to `config` ({} for a new run);
  raises ConfigChangeError for forbidden ones."""
  if not has_run_config(workdir):
    return {}
  old = read_run_config(workdir).to_dict()
  forbidden, allowed = config_changes(old, {**config.to_dict(), "model_kind": model_kind})
  if forbidden:
    raise ConfigChangeError(
        f"cannot resume {workdir}: changed fields fixed for a run's life: "
        f"{format_changes(forbidden)} (keep them, or start a new --workdir, e.g. with "
        f"--config.init_from={workdir})")
  return allowed


def open_run(config: ml_collections.ConfigDict, workdir: str, model_kind: str) -> WorkdirLock:
  """Opens the run in `workdir`, before anything in it is read or written: takes its lock
  (process 0; training/workdir_lock.py) and checks `config` against its config.json. Use as
  `with open_run(...):` around the whole run; `open_writer` later records the allowed changes.

  Raises:
    WorkdirLockedError: another live run holds the workdir (the message names it).
    ConfigChangeError: a resume changes fields fixed for the run's life (configs/
      run_layout.py `FROZEN_FIELDS`), listed on one line with their old -> new values.
  """
  lock = WorkdirLock(workdir, enabled=jax.process_index() == 0)
  lock.acquire()
  try:
    _resume_changes(config, workdir, model_kind)
  except BaseException:
    lock.release()
    raise
  return lock


def open_writer(config: ml_collections.ConfigDict, workdir: str, start: int,
                model_kind: str) -> MetricsWriter:
  """The run's metrics writer (process 0 only); writes config.json with the model kind.

  On resume, config changes allowed for a running run (configs/run_layout.py
  `RESUMABLE_FIELDS`) are logged and appended to config_history.jsonl at step `start`, and
  config.json then holds the new config; forbidden ones raise ConfigChangeError before
  anything is written.
  """
  allowed = _resume_changes(config, workdir, model_kind)
  # On resume, TensorBoard hides what a killed attempt logged after the checkpoint.
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0,
                         purge_step=start + 1 if start else None)
  if allowed and writer.enabled:
    logging.warning("resuming at step %d with config changes: %s", start,
                    format_changes(allowed))
    append_config_history(workdir, start, allowed)
  writer.write_hparams(config.to_dict(), model_kind)
  return writer


@dataclasses.dataclass
class OuterLoop:
  """See the module docstring. `progress(step, total, record, last)` is the progress line of
  a step's record (`last`: every figure's latest value); `flops_per_token` and `peak_flops`
  give `perf/mfu`."""
  config: ml_collections.ConfigDict
  checkpointer: Checkpointer
  writer: MetricsWriter
  progress: Callable[[int, int, dict, dict], str]
  flops_per_token: float = 0.0
  peak_flops: float = 0.0

  def _save_due(self, step: int) -> bool:
    every = self.checkpointer.save_every
    return every > 0 and step % every == 0

  def run(self, carry: Any, start: int, step_fn: StepFn,
          save: Callable[[int, Any, bool], None],
          evaluate: Callable[[Any], dict[str, float]] | None = None, *,
          stop_after: int | None = None, evaluate_at_start: bool = False) -> dict[str, float]:
    """Runs steps `start + 1 ..` to `config.train.steps` (or `stop_after`); returns the last
    value of every figure written.

    Raises:
      NonFiniteError: a step's loss or gradient norm was not finite (`train.nonfinite` 'stop',
        or more than `train.max_nonfinite_skips` in a row with 'skip'); no checkpoint was
        saved after it.
      Preempted: SIGTERM / SIGINT (training/preemption.py); a checkpoint of the step the
        run stopped at is committed.
    """
    train = self.config.train
    total = train.steps
    end = total if stop_after is None else min(stop_after, total)
    is_primary = jax.process_index() == 0
    last: dict[str, float] = {}
    if evaluate_at_start and start == 0 and evaluate is not None:
      last = evaluate(carry)  # the initial model: the "before" of the run
      self.writer.write(0, last)
      logging.info("%s", self.progress(0, total, last, last))
    step, window, window_start = start, _Window(), None
    guard = NonFiniteGuard(train.nonfinite, train.max_nonfinite_skips)
    preempted = False
    with PreemptionWatch() as watch:
      try:
        while step < end:
          carry, result = step_fn(carry, step)
          step += 1
          self.checkpointer.check()  # a failed background save stops the run here
          guard.add(step, result)
          first = window_start is None
          if first:
            # The first step of a process compiles; time from its end.
            jax.block_until_ready(carry)
            window_start = time.perf_counter()
            countdown = Countdown(end, first=step)  # the ETA of the progress line
          window.add(result, count_tokens=not first)
          preempted = watch.should_stop(step)
          log_step = step % train.log_every == 0 or step == total
          if log_step or preempted or self._save_due(step):
            guard.check()  # before any checkpoint: a diverged run never saves again
          save(step, carry, preempted)
          record = {}
          if log_step or preempted:
            record = window.record()
            elapsed = time.perf_counter() - window_start
            if window.tokens and elapsed > 0:
              record["perf/tokens_per_sec"] = window.tokens / elapsed
              if self.flops_per_token and self.peak_flops:
                record["perf/mfu"] = record["perf/tokens_per_sec"] * self.flops_per_token / (
                    self.peak_flops)
            window, window_start = _Window(), time.perf_counter()
          if evaluate is not None and train.eval_every and (step % train.eval_every == 0
                                                            or step == total):
            record.update(evaluate(carry))
            window_start = time.perf_counter()  # evaluation time is not training throughput
          if record:
            self.writer.write(step, record)
            last.update(record)
            if is_primary and any(k.startswith("train/") for k in record):
              eta = countdown.eta(step) if step < end else ""
              logging.info("%s%s", self.progress(step, total, record, last),
                           f" | {eta}" if eta else "")
          if preempted:
            break
        if not preempted:
          guard.check()
          save(step, carry, True)
      finally:
        # Every save started is committed (or its failure raised) before the process ends;
        # `close` settles the manager either way.
        try:
          self.checkpointer.close()
        finally:
          self.writer.close()
    if preempted:
      error = Preempted(step, watch.signal_name)
      logging.warning("%s", error)
      raise error
    return last

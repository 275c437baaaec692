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
import os
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from objectives.reductions import Metrics, add_metrics, finalize_metrics
from training.checkpoint import Checkpointer
from training.metrics import MetricsWriter



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
  return Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=config.checkpoint.max_to_keep,
                      save_every=config.checkpoint.every_steps,
                      async_save=config.checkpoint.async_save)


def open_writer(config: ml_collections.ConfigDict, workdir: str, start: int,
                model_kind: str) -> MetricsWriter:
  """The run's metrics writer (process 0 only); writes config.json with the model kind."""
  # On resume, TensorBoard hides what a killed attempt logged after the checkpoint.
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0,
                         purge_step=start + 1 if start else None)
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

  def run(self, carry: Any, start: int, step_fn: StepFn,
          save: Callable[[int, Any, bool], None],
          evaluate: Callable[[Any], dict[str, float]] | None = None, *,
          stop_after: int | None = None, evaluate_at_start: bool = False) -> dict[str, float]:
    """Runs steps `start + 1 ..` to `config.train.steps` (or `stop_after`); returns the last
    value of every figure written."""
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
    while step < end:
      carry, result = step_fn(carry, step)
      step += 1
      first = window_start is None
      if first:
        # The first step of a process compiles; time from its end.
        jax.block_until_ready(carry)
        window_start = time.perf_counter()
      window.add(result, count_tokens=not first)
      save(step, carry, False)
      record = {}
      if step % train.log_every == 0 or step == total:
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
          logging.info("%s", self.progress(step, total, record, last))
    save(step, carry, True)
    self.checkpointer.wait()
    self.checkpointer.close()
    self.writer.close()
    return last

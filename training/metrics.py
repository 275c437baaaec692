"""Run metrics: a JSONL file and TensorBoard events per run, a progress line, a throughput timer.

Files of a run in `workdir`:

    {workdir}/metrics.jsonl     one `{"step": step, "tag": value, ...}` line per `write` call,
                                appended across restarts; read it with `read_metrics`
    {workdir}/tensorboard/      TensorBoard event files (scalars under the same tags)
    {workdir}/config.json       the nested config of the run and its model kind
                                (`write_hparams`; reload it with configs/run_layout.py
                                `read_run_config`)

The layout of the whole run directory is configs/run_layout.py's.
"""

from __future__ import annotations

import collections.abc
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

from configs.run_layout import METRICS_FILE, TENSORBOARD_DIR, write_run_config



def _to_float(value: Any) -> float:
  """Converts a scalar (Python, numpy or jax, possibly a replicated global array) to float."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    # Metrics are replicated, so this process's first shard holds the whole value.
    value = value.addressable_data(0)
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"Metric must be a scalar, got shape {array.shape}.")
  return float(array.reshape(()))


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flattens nested mappings to `{"a.b.c": leaf}`; tuples become lists, odd leaves strings."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
      value = value.to_dict()
    if isinstance(value, collections.abc.Mapping):
      flat.update(flatten_dict(value, prefix=f"{name}."))
    elif isinstance(value, (tuple, list)):
      flat[name] = [v if isinstance(v, (str, int, float, bool)) else str(v) for v in value]
    elif value is None or isinstance(value, (str, int, float, bool)):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


class MetricsWriter:
  """Writes scalar metrics to `{workdir}/metrics.jsonl` and TensorBoard.

  Only one process of a multi-host run writes: the writer is disabled on every process but 0
  (and when `enabled` is False), where all its methods do nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, purge_step: int | None = None):
    """Opens (appending to) the run's metric files.

    Args:
      workdir: the run's directory.
      enabled: write at all; also forced off on processes other than 0.
      purge_step: for a run resumed from the checkpoint of step `purge_step - 1`: TensorBoard
        hides the events an earlier attempt logged at steps >= `purge_step`. (`read_metrics`
        resolves such steps in the JSONL file without it.)
    """
    self.enabled = enabled and jax.process_index() == 0
    self.workdir = workdir
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
    # tensorboardX names files by the second and host only; a writer reopened within the same
    # second (a quick restart) would truncate the earlier file without a unique suffix.
    self._tb = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR),
                             purge_step=purge_step, filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **metrics}` (values as floats) and logs each scalar to TB.

    Args:
      step: the optimizer step the metrics belong to.
      metrics: tag -> scalar (float, numpy or jax scalar); tags such as `train/loss`.
    """
    if not self.enabled:
      return
    values = {tag: _to_float(value) for tag, value in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    # Flushed per call: a crash must not lose the lines before it, and this runs every
    # `log_every` steps only.
    self._file.flush()
    for tag, value in values.items():
      self._tb.add_scalar(tag, value, global_step=int(step))
    self._tb.flush()

  def write_hparams(self, config: Mapping[str, Any], model_kind: str = "decoder") -> None:
    """Writes the config to `{workdir}/config.json` (nested, reloadable, with the model kind
    the run's checkpoints hold) and, flattened, as TensorBoard text.

    Args:
      config: nested mapping or `ml_collections.ConfigDict`.
      model_kind: decoder | encoder | reward (configs/run_layout.py).
    """
    if not self.enabled:
      return
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    flat = flatten_dict(config)
    write_run_config(self.workdir, config, model_kind)
    rows = [f"| `{key}` | `{json.dumps(flat[key])}` |" for key in sorted(flat)]
    self._tb.add_text("config", "\n".join(["| key | value |", "|---|---|", *rows]))
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; further calls do nothing."""
    if self._file is not None:
      self._file.close()
      self._tb.close()
    self._file = self._tb = None
    self.enabled = False

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """Reads `{workdir}/metrics.jsonl` as one record per step, in step order.

  A run resumed from an earlier checkpoint logs steps again that an earlier attempt already
  logged; the later lines win. When the step goes backwards in the file (a resume), every
  earlier record at that step or later is dropped, so no stale step of the crashed attempt
  survives. Records of the same step (train and eval metrics) merge, later values winning; so
  if the crashed attempt's last line is exactly the first step the resumed run logs, a tag
  only that attempt logged at that step survives.
  A truncated last line (a crash mid-write) is skipped.

  Args:
    workdir: the run's directory.

  Returns:
    Records `{"step": step, tag: value, ...}` sorted by step.
  """
  records: dict[int, dict[str, float]] = {}
  last_step = None
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    lines = f.read().splitlines()
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if index == len(lines) - 1:
        break
      raise
    step = record["step"]
    if last_step is not None and step < last_step:
      records = {s: r for s, r in records.items() if s < step}
    records.setdefault(step, {}).update(record)
    last_step = step
  return [records[step] for step in sorted(records)]


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any]) -> str:
  """One progress line, e.g. `step   120/600 | loss 3.412 | lr 2.9e-03 | 12,345 tok/s`.

  Shows `train/loss`, `train/accuracy`, `eval/loss` (the latest), `train/lr`,
  `perf/tokens_per_sec` and `perf/mfu` (a fraction, shown in percent) when present in
  `metrics`.
  """
  width = max(5, len(str(total_steps)))
  parts = [f"step {step:>{width}}/{total_steps}"]
  formats = (("train/loss", "loss {:.3f}"), ("train/accuracy", "acc {:.3f}"),
             ("eval/loss", "eval loss {:.3f}"), ("train/lr", "lr {:.1e}"),
             ("perf/tokens_per_sec", "{:,.0f} tok/s"))
  for tag, fmt in formats:
    if tag in metrics:
      parts.append(fmt.format(_to_float(metrics[tag])))
  if "perf/mfu" in metrics:
    parts.append(f"MFU {100 * _to_float(metrics['perf/mfu']):.1f}%")
  return " | ".join(parts)


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO-level chatter of orbax and JAX's backend probing; warnings still pass."""

  _NOISY = ("/orbax/", "/jax/_src/xla_bridge.py", "/jax/_src/distributed.py")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or not any(n in record.pathname for n in self._NOISY)


def quiet_library_logs() -> None:
  """Keeps a run's INFO log to this project's own lines (progress, evals, checkpoints)."""
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())

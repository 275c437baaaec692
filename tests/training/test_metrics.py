"""Tests for training/metrics.py: JSONL and TensorBoard output, resume semantics, progress line."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from training.metrics import (MetricsWriter, flatten_dict, format_progress,
                              read_metrics)


def _read_events(logdir):
  """Parses TFRecord-framed Event protos: u64 length, u32 crc, payload, u32 crc."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def _scalars(events):
  return [(e.step, v.tag, round(v.simple_value, 6))
          for e in events for v in e.summary.value if v.HasField("simple_value")]


def test_jsonl_lines_are_exact(tmp_path):
  workdir = str(tmp_path / "run")
  with MetricsWriter(workdir) as writer:
    writer.write(10, {"train/loss": jnp.float32(2.5), "train/lr": np.array(0.001)})
    writer.write(20, {"train/loss": 1.75, "eval/accuracy": jnp.array([0.5])})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  assert lines == [
      '{"step": 10, "train/loss": 2.5, "train/lr": 0.001}',
      '{"step": 20, "train/loss": 1.75, "eval/accuracy": 0.5}',
  ]
  with pytest.raises(ValueError):
    MetricsWriter(workdir).write(30, {"train/loss": np.ones(2)})


def test_resumed_run_appends_and_later_lines_win(tmp_path):
  workdir = str(tmp_path)
  with MetricsWriter(workdir) as writer:
    writer.write(10, {"train/loss": 4.0})
    writer.write(20, {"train/loss": 3.0})
    writer.write(20, {"eval/loss": 3.5})
    writer.write(30, {"train/loss": 2.5})
  # Resumed from the checkpoint of step 10: steps 20 and 30 are logged again.
  with MetricsWriter(workdir, purge_step=11) as writer:
    writer.write(20, {"train/loss": 2.0})
  assert read_metrics(workdir) == [
      {"step": 10, "train/loss": 4.0},
      {"step": 20, "train/loss": 2.0},
  ]
  # TensorBoard hides the crashed attempt's events from step 11 on.
  events = _read_events(os.path.join(workdir, "tensorboard"))
  restarts = [e.step for e in events if e.HasField("session_log")]
  assert restarts == [11]
  assert _scalars(events) == [(10, "train/loss", 4.0), (20, "train/loss", 3.0),
                              (20, "eval/loss", 3.5), (30, "train/loss", 2.5),
                              (20, "train/loss", 2.0)]
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 30, "train/loss": 1.')  # crashed mid-line
  assert [r["step"] for r in read_metrics(workdir)] == [10, 20]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len(f.read().splitlines()) == 6


def test_same_step_records_merge(tmp_path):
  with MetricsWriter(str(tmp_path)) as writer:
    writer.write(5, {"train/loss": 1.0})
    writer.write(5, {"eval/loss": 1.5})
    writer.write(5, {"train/loss": 0.75})
  assert read_metrics(str(tmp_path)) == [{"step": 5, "train/loss": 0.75, "eval/loss": 1.5}]


def test_tensorboard_scalars_and_config(tmp_path):
  workdir = str(tmp_path)
  config = ml_collections.ConfigDict({"optimizer": {"lr": 3e-4, "b": (0.9, 0.95)}, "stage": "sft"})
  with MetricsWriter(workdir) as writer:
    writer.write_hparams(config)
    writer.write(3, {"train/loss": 2.25, "perf/mfu": 0.5})
    writer.write(6, {"train/loss": 1.5})
  events = _read_events(os.path.join(workdir, "tensorboard"))
  assert _scalars(events) == [(3, "train/loss", 2.25), (3, "perf/mfu", 0.5),
                              (6, "train/loss", 1.5)]
  texts = [v.tensor.string_val[0].decode() for e in events for v in e.summary.value
           if v.tag.startswith("config")]
  assert texts and "| `optimizer.lr` | `0.0003` |" in texts[0]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == {"optimizer": {"b": [0.9, 0.95], "lr": 3e-4}, "stage": "sft",
                            "model_kind": "decoder"}


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  writer = MetricsWriter(workdir, enabled=False)
  writer.write(1, {"train/loss": 1.0})
  writer.write_hparams({"a": 1})
  writer.close()
  assert not os.path.exists(workdir)


def test_flatten_dict():
  assert flatten_dict({"a": {"b": 1, "c": {"d": None}}, "e": [1, "x"], "f": np.float32}) == {
      "a.b": 1, "a.c.d": None, "e": [1, "x"], "f": "<class 'numpy.float32'>"}


def test_format_progress():
  metrics = {"train/loss": 3.41213, "train/accuracy": 0.3124, "train/lr": 2.9e-3,
             "perf/tokens_per_sec": 12345.4, "perf/mfu": 0.4123, "eval/loss": 9.0}
  assert format_progress(120, 600, metrics) == (
      "step   120/600 | loss 3.412 | acc 0.312 | eval loss 9.000 | lr 2.9e-03 | 12,345 tok/s | "
      "MFU 41.2%")
  assert format_progress(7, 1_000_000, {"train/loss": jnp.float32(0.5)}) == (
      "step       7/1000000 | loss 0.500")

"""scripts/trace_summary.py: kernel time by name, busy time and span of a device's processes
in a Perfetto trace, checked on a hand-made trace."""

import gzip
import json
import os

import pytest

from scripts import trace_summary

EVENTS = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 1, "name": "gemm_a", "ts": 0, "dur": 10},
    {"ph": "X", "pid": 1, "name": "attention", "ts": 5, "dur": 10},  # overlaps gemm_a by 5
    {"ph": "X", "pid": 1, "name": "gemm_a", "ts": 30, "dur": 4},
    {"ph": "X", "pid": 1, "name": "fusion_12", "ts": 40, "dur": 2},
    {"ph": "X", "pid": 1, "name": "fusion_7", "ts": 50, "dur": 3},
    {"ph": "X", "pid": 2, "name": "host_work", "ts": 0, "dur": 100},  # another process
    {"ph": "i", "pid": 1, "name": "marker", "ts": 20},                # not a complete event
]


def test_kernels_busy_time_and_span_by_hand():
  s = trace_summary.summarize(EVENTS)
  assert s["launches"] == 5 and s["kernel_us"] == 29
  # Busy: [0, 15] + [30, 34] + [40, 42] + [50, 53] = 15 + 4 + 2 + 3; span 0 to 53.
  assert s["busy_us"] == 24 and s["span_us"] == 53
  assert [(k["name"], k["count"], k["total_us"]) for k in s["kernels"]] == [
      ("gemm_a", 2, 14), ("attention", 1, 10), ("fusion_7", 1, 3), ("fusion_12", 1, 2)]
  grouped = trace_summary.summarize(EVENTS, families=True)
  assert grouped["kernels"][2] == dict(name="fusion_#", count=2, total_us=5)
  text = trace_summary.format_summary(s, top=2)
  assert "busy 0.024 ms of a 0.053 ms span (45.3%)" in text and "in 2 more names" in text


def test_finds_the_newest_trace_and_names_what_is_missing(tmp_path):
  for run, mtime in (("a", 1000), ("b", 2000)):
    folder = tmp_path / "plugins" / "profile" / run
    folder.mkdir(parents=True)
    path = folder / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
      json.dump({"traceEvents": EVENTS}, f)
    os.utime(path, (mtime, mtime))
  found = trace_summary.find_trace(str(tmp_path))
  assert found.endswith(os.path.join("b", "perfetto_trace.json.gz"))
  assert trace_summary.load_events(found) == EVENTS
  with pytest.raises(FileNotFoundError, match="no perfetto_trace.json.gz below"):
    trace_summary.find_trace(str(tmp_path / "plugins" / "none"))
  with pytest.raises(ValueError, match="no process named '/device:TPU'"):
    trace_summary.summarize(EVENTS, device="/device:TPU")

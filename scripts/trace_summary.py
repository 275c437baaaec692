"""Where a device's time went in a JAX profiler trace: kernels by name, busy time and gaps.

  python -m scripts.trace_summary /tmp/trace               # the newest trace under a folder
  python -m scripts.trace_summary trace.json.gz --top 30 --device /device:GPU:0

Reads the Perfetto trace that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes
(`scripts.benchmark generate --profile DIR` makes one of a sampler call) and, for the
processes whose name starts with `--device` (a GPU's streams by default), adds up the
complete events ("X", one per kernel launch) by name:

  kernels  each name's launches, total and mean time, share of the busy time; `--families`
           groups names that differ only in their numbers (fusion_12, fusion_7 -> fusion_#)
  busy     the union of the kernels' intervals (time some kernel ran)
  span     first start to last end; busy / span says how much of it launch gaps and host
           waits took

Times are the trace's microseconds. The last line is the JSON summary.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import defaultdict
from typing import Any

from absl import app, flags

_DIGITS = re.compile(r"\d+")


def find_trace(path: str) -> str:
  """`path` itself, or the newest perfetto_trace.json.gz below the folder `path`."""
  if os.path.isfile(path):
    return path
  found = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names
           if name == "perfetto_trace.json.gz"]
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz below {path}")
  return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict[str, Any]]:
  """The trace's events (a JSON object's `traceEvents` or a bare list; gzip or plain)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def family(name: str) -> str:
  """`name` with its numbers as '#': launches of one kind of kernel together."""
  return _DIGITS.sub("#", name)


def _union(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop <= end:
      continue
    total += stop - max(start, end)
    end = stop
  return total


def summarize(events: list[dict[str, Any]], device: str = "/device:GPU",
              families: bool = False) -> dict[str, Any]:
  """Kernel time by name on the processes named `device...` (module doc)."""
  pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
          and str(e.get("args", {}).get("name", "")).startswith(device)}
  if not pids:
    raise ValueError(f"no process named {device!r}... in the trace")
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e]
  if not kernels:
    raise ValueError(f"no kernel events on {device!r}")
  by_name: dict[str, list[float]] = defaultdict(list)
  for e in kernels:
    by_name[family(e["name"]) if families else e["name"]].append(float(e["dur"]))
  intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
  busy = _union(intervals)
  span = max(stop for _, stop in intervals) - min(start for start, _ in intervals)
  rows = sorted(((name, len(d), sum(d)) for name, d in by_name.items()),
                key=lambda r: -r[2])
  return dict(device=device, launches=len(kernels), busy_us=busy, span_us=span,
              kernel_us=sum(r[2] for r in rows),
              kernels=[dict(name=n, count=c, total_us=t) for n, c, t in rows])


def format_summary(s: dict[str, Any], top: int = 20) -> str:
  lines = [f"{s['device']}: {s['launches']} kernel launches, busy {s['busy_us'] / 1e3:.3f} ms "
           f"of a {s['span_us'] / 1e3:.3f} ms span ({100 * s['busy_us'] / s['span_us']:.1f}%)"]
  for k in s["kernels"][:top]:
    lines.append(f"  {k['total_us'] / 1e3:9.3f} ms {100 * k['total_us'] / s['kernel_us']:5.1f}%"
                 f" {k['count']:6d} x {k['total_us'] / k['count']:8.2f} us  {k['name'][:90]}")
  rest = s["kernels"][top:]
  if rest:
    lines.append(f"  {sum(k['total_us'] for k in rest) / 1e3:9.3f} ms in {len(rest)} more names")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("expected one trace file or folder")
  f = flags.FLAGS
  summary = summarize(load_events(find_trace(argv[1])), f.device, f.families)
  print(format_summary(summary, f.top))
  print(json.dumps(summary))


if __name__ == "__main__":
  flags.DEFINE_string("device", "/device:GPU", "Processes whose name starts with this.")
  flags.DEFINE_integer("top", 20, "Kernel names listed.")
  flags.DEFINE_bool("families", False, "Group names that differ only in their numbers.")
  app.run(main)

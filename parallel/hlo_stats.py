"""What a compiled program's mesh costs: its collectives, counted from the compiled HLO text.

`compiled.as_text()` (a `jax.stages.Compiled`) prints the partitioned per-device program: one
block per computation, the `ENTRY` one last. A collective is one instruction,

    %all-gather.147 = bf16[1,64,128]{2,1,0:T(8,128)(2,1)} all-gather(%param_0.1377), ...

whose result shape is what lands on each device. The TPU compiler puts most of them inside
fused computations (`async_collective_fusion`), called from the entry or from a `while` body:
the layer scan of a scanned model, the micro-batch scan of gradient accumulation, the
sampler's decode loop. So that a count means "per run of the program", every computation gets
a multiplier: how many times it runs per run of the entry. A `while` body runs as often as
its condition allows; XLA's compiled text states no trip count, but a counted loop's condition
is `compare(counter, constant(N)), direction=LT`, so N is read from there. A loop whose
condition is anything else (the decode loop, which also stops when every row is done) counts
as running its bound when a constant bound is found, else once, and is reported as such.
"""

from __future__ import annotations

import dataclasses
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "f8e4m3b11fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
WHILE = re.compile(r"\swhile\(.*\bcondition=%?([\w.\-]+).*\bbody=%?([\w.\-]+)")
_CONSTANT = re.compile(r"\bs(?:32|64)\[\][^=]*constant\((\d+)\)")
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class CollectiveStats:
  """Collectives of one program, by op (COLLECTIVES), for one device.

  count / bytes: times each op runs per run of the program and the bytes of their results
  (loop bodies multiplied by their trip counts); static: instructions in the text;
  loops / unbounded_loops: `while` loops, and those without a constant bound (counted once).
  """
  count: dict[str, int]
  bytes: dict[str, int]
  static: dict[str, int]
  loops: int
  unbounded_loops: int

  def summary(self) -> str:
    """`all-gather 96 x (1.2 GiB), all-reduce 3 x (4.0 KiB)`; 'none' without collectives."""
    parts = [f"{op} {self.count[op]} x ({format_bytes(self.bytes[op])})"
             for op in COLLECTIVES if self.count[op]]
    return ", ".join(parts) or "none"


def format_bytes(n: int) -> str:
  for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def split_computations(text: str) -> tuple[dict[str, list[str]], str]:
  """HLO module text -> ({computation name: its instruction lines}, the entry's name)."""
  computations, entry, current = {}, "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and current is None:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def loop_bound(condition: list[str]) -> int | None:
  """A `while` condition's constant bound N (`counter < N`), or None when it has none."""
  if not any("direction=LT" in line for line in condition):
    return None
  bounds = [int(m.group(1)) for line in condition for m in [_CONSTANT.search(line)] if m]
  return max(bounds) if bounds else None


def trip_count(while_line: str, computations: dict[str, list[str]]) -> int | None:
  """Iterations of the `while` instruction on `while_line`: the compiler's own count when it
  states one (XLA:GPU's `known_trip_count`, which also counts a loop it unrolled by two for
  double buffering correctly), else the condition's constant bound, else None."""
  known = _KNOWN_TRIP_COUNT.search(while_line)
  if known:
    return int(known.group(1))
  loop = WHILE.search(while_line)
  return loop_bound(computations.get(loop.group(1), [])) if loop else None


def computation_multipliers(computations: dict[str, list[str]], entry: str
                            ) -> tuple[dict[str, int], int, int]:
  """(runs of each computation per run of `entry`, while loops, loops without a bound)."""
  calls: dict[str, list[tuple[str, int]]] = {}
  loops = unbounded = 0
  for name, lines in computations.items():
    edges = []
    for line in lines:
      factor_of = {}
      loop = WHILE.search(line)
      if loop:
        loops += 1
        bound = trip_count(line, computations)
        unbounded += bound is None
        factor_of[loop.group(2)] = bound or 1
      for _, callee in _CALLEE.findall(line):
        edges.append((callee, factor_of.get(callee, 1)))
      for group in _CALLEE_LIST.findall(line):
        edges += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
    calls[name] = [(c, f) for c, f in edges if c in computations]
  order: list[str] = []
  seen: set[str] = set()

  def visit(name: str) -> None:  # post-order: callees before their callers
    seen.add(name)
    for callee, _ in calls[name]:
      if callee not in seen:
        visit(callee)
    order.append(name)

  visit(entry)
  runs = {name: 0 for name in computations}
  runs[entry] = 1
  for name in reversed(order):
    for callee, factor in calls[name]:
      runs[callee] += runs[name] * factor
  return runs, loops, unbounded


def _result_bytes(shape_text: str, is_start: bool) -> int:
  sizes = []
  for dtype, dims in SHAPE.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    sizes.append(n * _DTYPE_BYTES[dtype])
  # An async `-start` returns (operands, results, context): its largest buffer is the result.
  return (max(sizes) if is_start else sum(sizes)) if sizes else 0


def shape_bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape's text (`bf16[4,8]{1,0}`, or a tuple of them)."""
  return _result_bytes(shape_text, False)


def collective_stats(text: str) -> CollectiveStats:
  """The collectives of a compiled program's HLO text (`compiled.as_text()`)."""
  computations, entry = split_computations(text)
  runs, loops, unbounded = computation_multipliers(computations, entry)
  count = {op: 0 for op in COLLECTIVES}
  size = dict(count)
  static = dict(count)
  for name, lines in computations.items():
    for line in lines:
      match = _COLLECTIVE.search(line)
      if match is None:
        continue
      op = match.group(2)
      static[op] += 1
      count[op] += runs[name]
      size[op] += runs[name] * _result_bytes(match.group(1), bool(match.group(3)))
  return CollectiveStats(count=count, bytes=size, static=static, loops=loops,
                         unbounded_loops=unbounded)

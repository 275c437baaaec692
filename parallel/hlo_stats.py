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
from typing import Callable, Mapping

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "f8e4m3b11fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*\bcondition=%?([\w.\-]+).*\bbody=%?([\w.\-]+)")
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
  loop = _WHILE.search(while_line)
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
      loop = _WHILE.search(line)
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
  for dtype, dims in _SHAPE.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    sizes.append(n * _DTYPE_BYTES[dtype])
  # An async `-start` returns (operands, results, context): its largest buffer is the result.
  return (max(sizes) if is_start else sum(sizes)) if sizes else 0


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


# --- Kernels and memory traffic of a loop body (the sampler's decode step) ------------------

# Instructions of a non-fused computation that launch no kernel: control flow, tuples,
# aliases and constants (a loop's or branch's own kernels are counted in its computation).
_NO_KERNEL = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
              "conditional", "call", "after-all", "add-dependency", "opt-barrier",
              "partition-id", "replica-id")
# Ops through which a fused parameter is read element for element (followed to a slice).
_PASS_THROUGH = ("convert", "bitcast", "copy", "reshape", "negate")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(,.*)?$")
_OPERAND = re.compile(r"%([\w.\-]+)")
# What a fusion holds, for its kind: the ops below that appear in its fused computation.
_KIND_OPS = ("dot", "convolution", "dynamic-slice", "dynamic-update-slice", "slice", "reduce",
             "concatenate", "gather", "scatter", "transpose", "copy")


@dataclasses.dataclass(frozen=True)
class KernelStats:
  """Kernels one iteration of a loop launches and the memory they move (module below).

  kernels: launches per iteration (nested loops times their trip counts);
  read / written: bytes read and written by them, estimated from the compiled program;
  by_kind: kind -> (launches, bytes read + written), a kind being a custom call's target
  (`__cublas$lt$matmul`) or the sorted ops that a fusion holds ("copy,dynamic-slice": a
  slice copied out of a bigger buffer).
  """
  kernels: int
  read: int
  written: int
  by_kind: dict[str, tuple[int, int]]

  def summary(self, top: int = 6) -> str:
    kinds = sorted(self.by_kind.items(), key=lambda kv: -kv[1][1])[:top]
    return (f"{self.kernels} kernels, {format_bytes(self.read)} read, "
            f"{format_bytes(self.written)} written; "
            + ", ".join(f"{kind or 'elementwise'} {n} x ({format_bytes(b)})"
                        for kind, (n, b) in kinds))


def _instructions(lines: list[str]) -> list[tuple[bool, str, str, str, list[str], str]]:
  """(is root, name, result shape, opcode, operand names, attributes) of each instruction."""
  out = []
  for line in lines:
    match = _INSTRUCTION.match(line)
    if match:
      root, name, shape, op, args, rest = match.groups()
      out.append((bool(root), name, shape, op, _OPERAND.findall(args), rest or ""))
  return out


def shape_bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape's text (`bf16[4,8]{1,0}`, or a tuple of them)."""
  return _result_bytes(shape_text, False)


def shape_dims(shape_text: str) -> tuple[int, ...]:
  """The dimensions of the first array in an HLO shape's text."""
  match = _SHAPE.search(shape_text)
  return tuple(int(d) for d in filter(None, match.group(2).split(","))) if match else ()


_shape_bytes = shape_bytes


def _elements(shape_text: str) -> int:
  match = _SHAPE.search(shape_text)
  if not match:
    return 0
  n = 1
  for d in filter(None, match.group(2).split(",")):
    n *= int(d)
  return n


def _read_share(computations: dict[str, list[str]], fused: str, index: int) -> float:
  """The share of parameter `index` of fused computation `fused` that it reads: 1 whole, 0
  only updated in place, else the share its slices take (`_fusion_traffic`). A parameter
  passed on to a nested fusion (XLA:TPU fuses a stacked weight's dynamic slice into its
  matmul's fusion that way) reads what the nested one reads of it."""
  instructions = _instructions(computations.get(fused, []))
  shapes = {name: shape for _, name, shape, *_ in instructions}
  users: dict[str, list[tuple[str, str, int, str]]] = {}
  param = None
  for _, name, _, op, operands, rest in instructions:
    for i, operand in enumerate(operands):
      users.setdefault(operand, []).append((op, name, i, rest))
  for line in computations.get(fused, []):
    match = re.search(r"%([\w.\-]+) = .* parameter\((\d+)\)", line)
    if match and int(match.group(2)) == index:
      param = match.group(1)
  if param is None or not users.get(param):
    return 1.0
  frontier, share, read_at_all = [param], 0.0, False
  total = max(_elements(shapes[param]), 1)
  while frontier:
    for op, user, i, rest in users.get(frontier.pop(), []):
      if op in _PASS_THROUGH:
        frontier.append(user)
      elif op in ("slice", "dynamic-slice", "gather") and i == 0:
        share += _elements(shapes[user]) / total
        read_at_all = True
      elif op == "dynamic-update-slice" and i == 0:
        continue
      elif op == "fusion" and re.search(r"calls=%([\w.\-]+)", rest):
        nested = re.search(r"calls=%([\w.\-]+)", rest).group(1)
        share += _read_share(computations, nested, i)
        read_at_all = True
      else:
        return 1.0
  return min(1.0, share) if read_at_all else 0.0


def _fusion_traffic(computations: dict[str, list[str]], fused: str, operand_shapes: list[str],
                    result_shape: str) -> tuple[int, int]:
  """(bytes read, bytes written) of a fusion running the fused computation `fused`.

  A parameter is read whole, except one read only through slices (dynamic or static, or a
  gather, possibly after converts and bitcasts, or inside a nested fusion: a scanned layer's
  slice of the stacked weights, one layer's slice of the KV cache), counted as the slices'
  share of it, and one only updated in place (the buffer of a dynamic-update-slice), not
  read. The result is written whole, except an in-place dynamic-update-slice, which writes
  its update.
  """
  instructions = _instructions(computations[fused])
  shapes = {name: shape for _, name, shape, *_ in instructions}
  read = sum(int(_shape_bytes(shape) * _read_share(computations, fused, index))
             for index, shape in enumerate(operand_shapes))
  written = 0
  root = next((r for r in instructions if r[0]), None)
  outputs = [root] if root and root[3] != "tuple" else [
      next(r for r in instructions if r[1] == o) for o in (root[4] if root else [])]
  for out in outputs:
    if out[3] == "dynamic-update-slice":
      written += _shape_bytes(shapes[out[4][1]])
    else:
      written += _shape_bytes(out[2])
  return read, written if outputs else _shape_bytes(result_shape)


# A custom call's bytes read, from its operands' shape texts (`loop_kernel_stats`'s readers).
Reader = Callable[[list[str]], int]


def _kernels(computations: dict[str, list[str]], name: str,
             readers: Mapping[str, Reader] | None = None):
  """(kind, bytes read, bytes written) of each kernel that computation `name` launches."""
  shapes: dict[str, str] = {}
  for _, inst, shape, op, operands, rest in _instructions(computations[name]):
    shapes[inst] = shape
    if op in _NO_KERNEL:
      continue
    operand_shapes = [shapes.get(o, "") for o in operands]
    callee = re.search(r"calls=%([\w.\-]+)", rest)
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    if op == "fusion" and callee and callee.group(1) in computations:
      fused = computations[callee.group(1)]
      read, written = _fusion_traffic(computations, callee.group(1), operand_shapes, shape)
      body = "\n".join(fused)
      kind = ",".join(o for o in sorted(_KIND_OPS) if f" {o}(" in body)
    elif op == "dynamic-update-slice":  # in place: the update is read and written
      read = written = _shape_bytes(operand_shapes[1])
      kind = op
    elif op in ("dynamic-slice", "slice"):  # the slice is read and written
      read = written = _shape_bytes(shape)
      kind = op
    else:
      read = sum(_shape_bytes(s) for s in operand_shapes)
      written = _shape_bytes(shape)
      kind = target.group(1) if target else op
      if target and "cublas" in kind and shape.startswith("("):
        # cuBLAS calls return (result, s8[workspace]): scratch, not traffic.
        parts = _SHAPE.findall(shape)
        if parts and parts[-1][0] == "s8":
          written -= _shape_bytes("s8[%s]" % parts[-1][1])
      op_name = re.search(r'op_name="([^"]*)"', rest)
      for key, reader in (readers or {}).items():
        if target and op_name and key in op_name.group(1):
          read, kind = reader(operand_shapes), key
          break
    yield kind, read, written


def loop_kernel_stats(text: str, loop: int = -1,
                      readers: Mapping[str, Reader] | None = None) -> KernelStats:
  """Kernels and memory traffic of one iteration of the entry computation's `loop`-th
  `while` loop (default the last: the sampler's decode loop, which follows the prefill),
  loops nested in its body counted by their trip counts (`trip_count`; 1 when unknown).

  The traffic is an estimate from shapes (`_fusion_traffic`): each kernel reads its operands
  and writes its result, slices and in-place updates counted as what they touch. Caches are
  not modelled, so a kernel that reads what the one before it wrote is counted in full. A
  custom call (a Pallas kernel) reads its operands whole, unless its op name contains a key
  of `readers`, whose function gives its bytes read from its operands' shapes (and whose key
  names its kind).
  """
  computations, entry = split_computations(text)
  loops = [(line, m.group(2)) for line in computations[entry]
           for m in [_WHILE.search(line)] if m]
  if not loops:
    raise ValueError("no while loop in the entry computation")
  return _stats(computations, loops[loop][1], readers)


def program_kernel_stats(text: str, readers: Mapping[str, Reader] | None = None
                         ) -> KernelStats:
  """`loop_kernel_stats` of a whole run of the program: the entry computation's own kernels
  and every loop's, each by its trip count."""
  computations, entry = split_computations(text)
  return _stats(computations, entry, readers)


def _stats(computations: dict[str, list[str]], body: str,
           readers: Mapping[str, Reader] | None) -> KernelStats:
  """Kernels and traffic of one run of computation `body`, nested loops by trip count."""
  count = read = written = 0
  by_kind: dict[str, tuple[int, int]] = {}

  def visit(body: str, times: int) -> None:
    nonlocal count, read, written
    for kind, r, w in _kernels(computations, body, readers):
      count += times
      read += times * r
      written += times * w
      n, b = by_kind.get(kind, (0, 0))
      by_kind[kind] = (n + times, b + times * (r + w))
    for line in computations[body]:
      nested = _WHILE.search(line)
      if nested:
        visit(nested.group(2), times * (trip_count(line, computations) or 1))

  visit(body, 1)
  return KernelStats(kernels=count, read=read, written=written, by_kind=by_kind)

"""What a compiled program's kernels move: launches and bytes read and written, estimated from
the compiled HLO text (`compiled.as_text()`).

On a GPU every instruction of a non-fused computation that is not control flow, a tuple or an
alias is one kernel launch: a fusion, a library call (cuBLAS), a custom call (a Pallas kernel).
`loop_kernel_stats` counts what one iteration of a loop launches (the sampler's decode step:
scripts/decode_check.py), `program_kernel_stats` a whole run (`gpu_traffic` splits it by kind
for scripts/compile_check.py on GPUs), nested loops by their trip counts (parallel/hlo_stats.py `trip_count`). The bytes are an
estimate from shapes: each kernel reads its operands and writes its result, a fused parameter
read only through slices counts as the slices' share, in-place updates as their update.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

from parallel.gpu_target import GPU_SPECS
from parallel.hlo_stats import (SHAPE, WHILE, format_bytes, shape_bytes, split_computations,
                                trip_count)

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


def shape_dims(shape_text: str) -> tuple[int, ...]:
  """The dimensions of the first array in an HLO shape's text."""
  match = SHAPE.search(shape_text)
  return tuple(int(d) for d in filter(None, match.group(2).split(","))) if match else ()


_shape_bytes = shape_bytes


def _elements(shape_text: str) -> int:
  match = SHAPE.search(shape_text)
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
        parts = SHAPE.findall(shape)
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
           for m in [WHILE.search(line)] if m]
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
      nested = WHILE.search(line)
      if nested:
        visit(nested.group(2), times * (trip_count(line, computations) or 1))

  visit(body, 1)
  return KernelStats(kernels=count, read=read, written=written, by_kind=by_kind)


def gpu_traffic(text: str, device_kind: str) -> dict[str, Any]:
  """A GPU program's kernels and the bytes they move in one run (`program_kernel_stats`'s
  estimate from shapes), split into GEMMs (cuBLAS calls, XLA's Triton dot fusions), custom
  kernels (Pallas, cuDNN) and the other fusions, whose bytes at the GPU's published bandwidth
  bound the time of the memory-bound work between the matrix products."""
  stats = program_kernel_stats(text)
  moved = dict(gemm=0, custom=0, other=0)
  for kind, (_, n) in stats.by_kind.items():
    group = ("gemm" if "cublas" in kind or "dot" in kind.split(",") else
             "custom" if kind.startswith("__") else "other")
    moved[group] += n
  bandwidth = next((spec[2] for spec in GPU_SPECS.values() if spec[5] == device_kind), None)
  return dict(kernels=stats.kernels, moved=moved, bandwidth=bandwidth,
              other_s=moved["other"] / bandwidth if bandwidth else None)

"""A decode step's products, `x [rows, K] @ w [K, N]` with few rows, as a Pallas (Triton) kernel.

A decode step multiplies a few rows (one new token per sequence) by every weight matrix once, so
its products are bound by the bytes of the weights, not by FLOPs. A GEMM library tiles such a
product over its output columns only: an H200 profile of the 1B decode step (README,
"Benchmarks") found the 32-row projections running as cuBLAS GEMMs at about a third of the
chip's bandwidth, reading the weights in 8-16-row tiles. This kernel lays the work out for the
weights' stream instead:

    program (j, s) of the grid (N / block_n, splits) owns output columns
    [j block_n, (j + 1) block_n) and the s-th of `splits` equal parts of K; it streams its
    [K / splits, block_n] slab of w once, block_k rows at a time (Triton pipelines the loads
    over `stages`), against the matching columns of x (every row, kept whole: x is small),
    accumulating in float32:
        partial[s, :, cols] = sum over its part of K of x[:, k] w[k, cols]
    y = sum_s partial[s] (* scale[cols], int8 weights) as the output dtype

Splitting K (`splits` > 1) gives enough programs to keep every SM streaming when N alone gives
few column blocks (the 1B model's o projection: N = 2048, 32 blocks of 64 against 132 SMs); the
float32 partials (splits x rows x N x 4 bytes, a few percent of the weights' bytes at 32 rows)
are summed by XLA, which fuses the sum with the product's consumer. The sum's order is fixed,
so results are deterministic (no atomics).

Int8 weights (models/quantize.py, per output column scale) are read as int8 and converted in
the kernel, so the weight stream is a byte a weight. `transposed` takes w as `[N, K]` (the tied
embedding table as the LM head).

`plan` picks the blocks: block_n 64 (or the largest power of two <= 64 dividing N), block_k 64,
and the fewest splits (dividing K's blocks) that give at least `TARGET_PROGRAMS` programs,
each keeping at least 4 blocks of K, the partials under an eighth of the weights' bytes
(block_n halves, down to 32, where the splits that allows leave too few programs). `problem` says why a product is not served (the caller
then keeps XLA's product): more than `MAX_ROWS` rows, N or K not multiples of 16.

Where it runs: the sampler's decode steps on GPUs, when asked (`make_sampler(gemm=
"pallas")`, `scripts.benchmark generate --decode_gemm pallas`, config.rl.decode_gemm):
`products` marks the trace of a decode step, and models/layers.py `dense` and the tied LM
head route their products here while it is active. Under a mesh it runs on each device's
rows where the weights' output columns are whole on every device (`maybe_dot`). `interpret=True` runs the kernel in
Pallas's interpreter, which is how the CPU tests check it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from parallel import rules as rules_lib

MAX_ROWS = 128          # rows above this are a GEMM's work (prefill), not a stream's
MIN_TILE = 16           # Triton's smallest dot tile
TARGET_PROGRAMS = 256   # about two programs an SM on an H100 / H200 (132 SMs)
MIN_STEPS = 4           # blocks of K a program streams at least
MIN_BLOCK_N = 32        # output columns a program at least (64-byte rows of bf16 weights)
GEMMS = ("xla", "pallas")
# Logical axes of a product's output columns: split over a mesh axis, the products stay XLA's.
COLUMN_AXES = ("heads", "kv_heads", "mlp", "vocab")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A product's tiling: output columns a program, K rows a loop step, parts of K."""
  block_n: int
  block_k: int
  splits: int


def problem(rows: int, k: int, n: int) -> str | None:
  """Why the kernel does not serve `[rows, k] @ [k, n]` (None: it does)."""
  if rows > MAX_ROWS:
    return f"{rows} rows, more than {MAX_ROWS}"
  if k % MIN_TILE or n % MIN_TILE:
    return f"K {k} and N {n} must be multiples of {MIN_TILE}"
  return None


def _largest_block(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n (n a multiple of MIN_TILE)."""
  block = cap
  while n % block:
    block //= 2
  return block


def plan(rows: int, k: int, n: int, *, weight_bytes: int = 2, block_n: int = 64,
         block_k: int = 64, target_programs: int = TARGET_PROGRAMS) -> Plan:
  """The tiling of `[rows, k] @ [k, n]` with weights of `weight_bytes` a value (module doc).

  `block_n` / `block_k` are caps. Splits of K are the fewest (each part at least MIN_STEPS
  blocks) giving `target_programs` programs, and at most as many as keep the float32
  partials under an eighth of the weights' bytes; where that still leaves too few programs,
  block_n halves, down to MIN_BLOCK_N.
  """
  block_k = _largest_block(k, block_k)
  steps = k // block_k
  padded = max(MIN_TILE, 1 << (rows - 1).bit_length())
  most = max(1, k * weight_bytes // (8 * 4 * padded))
  allowed = [s for s in range(1, min(steps, most) + 1)
             if steps % s == 0 and (s == 1 or steps // s >= MIN_STEPS)]
  block_n = _largest_block(n, block_n)
  while True:
    splits = next((s for s in allowed if (n // block_n) * s >= target_programs), allowed[-1])
    if (n // block_n) * splits >= target_programs or block_n <= MIN_BLOCK_N:
      return Plan(block_n, block_k, splits)
    block_n //= 2


def _kernel(x_ref, w_ref, *refs, block_k: int, steps: int, transposed: bool, scaled: bool):
  """Program (j, s): columns j of the output, part s of K (module doc)."""
  scale_ref, o_ref = refs if scaled else (None, refs[0])
  part = pl.program_id(1)
  block_n = w_ref.shape[0] if transposed else w_ref.shape[1]
  contract = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))

  def step(i, acc):
    ks = pl.ds((part * steps + i) * block_k, block_k)
    x = x_ref[:, ks]
    w = (w_ref[:, ks] if transposed else w_ref[ks, :]).astype(x.dtype)
    return acc + jax.lax.dot_general(x, w, contract, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, steps, step,
                          jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
  if scaled:
    acc = acc * scale_ref[...][None, :]
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "transposed", "block_n", "block_k",
                                             "splits", "warps", "stages", "interpret"))
def skinny_dot(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *,
               out_dtype=None, transposed: bool = False, block_n: int = 64,
               block_k: int = 64, splits: int | None = None, warps: int = 4,
               stages: int = 3, interpret: bool = False) -> jax.Array:
  """`x @ w` (`x @ w.T` when `transposed`), times `scale` per output column when given.

  Args:
    x: `[rows, K]`, rows <= MAX_ROWS.
    w: `[K, N]` (`[N, K]` when `transposed`), in x's dtype or int8 (converted in the kernel).
    scale: `[N]` float32 output-column scales (int8 weights), or None.
    out_dtype: the result's dtype (x's by default).
    block_n, block_k: caps on the tiles (`plan`); splits: parts of K (None: `plan`'s).
    warps, stages: Triton's warps a program and pipeline stages of its loop.
    interpret: run in Pallas's interpreter (CPU tests).
  Returns:
    `[rows, N]` in `out_dtype`: the product accumulated in float32.
  """
  rows, k = x.shape
  n = w.shape[0] if transposed else w.shape[1]
  if (w.shape[1] if transposed else w.shape[0]) != k:
    raise ValueError(f"skinny_dot: x {x.shape} and w {w.shape} (transposed={transposed}) "
                     "do not contract")
  reason = problem(rows, k, n)
  if reason:
    raise ValueError(f"skinny_dot: {reason}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  tiling = plan(rows, k, n, weight_bytes=w.dtype.itemsize, block_n=block_n,
                block_k=block_k)
  if splits is not None:
    if (k // tiling.block_k) % splits:
      raise ValueError(f"skinny_dot: {splits} splits do not divide K's "
                       f"{k // tiling.block_k} blocks of {tiling.block_k}")
    tiling = dataclasses.replace(tiling, splits=splits)
  padded = max(MIN_TILE, 1 << (rows - 1).bit_length())
  if padded != rows:
    x = jnp.pad(x, ((0, padded - rows), (0, 0)))
  bn, s = tiling.block_n, tiling.splits
  steps = k // tiling.block_k // s
  w_spec = (pl.BlockSpec((bn, k), lambda j, p: (j, 0)) if transposed
            else pl.BlockSpec((k, bn), lambda j, p: (0, j)))
  in_specs = [pl.BlockSpec((padded, k), lambda j, p: (0, 0)), w_spec]
  args = [x, w]
  scaled = scale is not None and s == 1
  if scaled:
    in_specs.append(pl.BlockSpec((bn,), lambda j, p: (j,)))
    args.append(scale.reshape(n).astype(jnp.float32))
  if s == 1:
    out_spec = pl.BlockSpec((padded, bn), lambda j, p: (0, j))
    out_shape = jax.ShapeDtypeStruct((padded, n), out_dtype)
  else:
    out_spec = pl.BlockSpec((None, padded, bn), lambda j, p: (p, 0, j))
    out_shape = jax.ShapeDtypeStruct((s, padded, n), jnp.float32)
  y = pl.pallas_call(
      functools.partial(_kernel, block_k=tiling.block_k, steps=steps, transposed=transposed,
                        scaled=scaled),
      grid=(n // bn, s), in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret, name="decode_gemm",
  )(*args)
  if s > 1:
    y = y.sum(axis=0)
    if scale is not None:
      y = y * scale.reshape(n).astype(jnp.float32)
    y = y.astype(out_dtype)
  return y[:rows]


# Set while a decode step is traced with the kernel asked for: (interpret,) or None.
_ACTIVE: contextvars.ContextVar[tuple[bool] | None] = contextvars.ContextVar(
    "decode_gemm", default=None)


def check_gemm(gemm: str, platform: str) -> None:
  """Raises ValueError unless `gemm` is one of GEMMS and runs on `platform`."""
  if gemm not in GEMMS:
    raise ValueError(f"unknown decode GEMM {gemm!r}; choose one of {GEMMS}")
  if gemm == "pallas" and platform != "gpu":
    raise ValueError(f"decode GEMM 'pallas' is a GPU (Triton) kernel; this run's devices are "
                     f"{platform.upper()}")


@contextlib.contextmanager
def products(enabled: bool, interpret: bool = False):
  """While tracing inside, `maybe_dot` serves the products it can (module doc)."""
  token = _ACTIVE.set((interpret,) if enabled else None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> bool:
  """Whether a decode step that asked for the kernel is being traced (`products`)."""
  return _ACTIVE.get() is not None


def maybe_dot(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *,
              out_dtype=None, transposed: bool = False) -> jax.Array | None:
  """`skinny_dot(x, w, scale, ...)` when a decode step asked for the kernel (`products`) and
  it serves the shapes; else None (the caller multiplies with XLA).

  Under a mesh of several devices (`parallel.rules.use_mesh_rules`) it runs inside shard_map
  on each device's rows (x split like the `batch` logical axis) against the whole weight,
  where no weight's output columns are split (the rules map none of `COLUMN_AXES` to a mesh
  axis of more than one device): a data-parallel sampler. Weights split along K (fsdp) are
  gathered first, as XLA's product gathers them. Tensor-parallel products stay XLA's.
  """
  active = _ACTIVE.get()
  if active is None or x.ndim != 2 or w.ndim != 2:
    return None
  k, n = (w.shape[1], w.shape[0]) if transposed else w.shape
  kw = dict(out_dtype=out_dtype, transposed=transposed, interpret=active[0])
  context = rules_lib._CONTEXT.get()  # pylint: disable=protected-access
  if context is None or context[0].size == 1:
    return None if problem(x.shape[0], k, n) else skinny_dot(x, w, scale, **kw)
  mesh, rules = context
  spec = lambda name: rules_lib.logical_to_spec((name,), rules, mesh=mesh)[0]
  rows = spec("batch")
  split = rules_lib.spec_size(mesh, rows)
  if (any(rules_lib.spec_size(mesh, spec(a)) > 1 for a in COLUMN_AXES)
      or x.shape[0] % split or problem(x.shape[0] // split, k, n)):
    return None
  args, specs = [x, w], [P(rows, None), P(None, None)]
  if scale is not None:
    args.append(scale.reshape(n))
    specs.append(P(None))
  local = lambda x, w, scale=None: skinny_dot(x, w, scale, **kw)
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(rows, None),
                       check_vma=False)(*args)

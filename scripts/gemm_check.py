"""Times a decode step's matrix products alone: XLA's GEMMs against models/decode_gemm.py's kernel.

  python -m scripts.gemm_check --preset 1b --rows 32                  # on a GPU
  python -m scripts.gemm_check --preset 1b --rows 32 --weights int8

A decode step's products (`[rows, K] @ [K, N]`, one new token a row) are bound by the bytes of
their weights. For each product of the preset's decoder as the GPU sampler runs it (q / k / v
joined, o, gate / up joined, down, the LM head: `decode_products`), this times XLA's product
(cuBLAS, or XLA's Triton GEMMs for int8 weights, as the sampler compiles them) and the Pallas
kernel under `plan`'s tiling and a few others (`VARIANTS`), and prints each one's weight
bandwidth against the chip's published peak. So one GPU run says whether the kernel beats the
library at these shapes, and with which tiling.

A timing is one jitted call of `copies` products, each on its own copy of the weights
(together at least `--stream_mib`, so a copy is not still in the L2 cache when read again),
divided by `copies`: it includes the gaps between launches, as a decode step does. The last
block adds the products up over the step (each layer's four, the LM head once) for each way.
`--interpret` runs the kernel in Pallas's interpreter (tests on a CPU: its times mean nothing).
The last line is the JSON summary.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import pretrain
from models import decode_gemm
from models.quantize import quantize_int8
from models.sampler import GPU_INT8_COMPILER_OPTIONS, SAMPLER_COMPILER_OPTIONS
from parallel.xla_settings import GPU_FLAGS, compiler_options
from scripts.benchmarks.generation import bandwidth_figures

# name -> skinny_dot overrides; "plan" is decode_gemm.plan's choice.
VARIANTS = {
    "plan": {},
    "no_split": dict(splits=1),
    "n32": dict(block_n=32),
    "n16_no_split": dict(block_n=16, splits=1),
    # No split sums to launch, deeper loads instead: 16 or 32 columns of 256 rows of K a
    # step, 4 stages in flight.
    "n16_k256": dict(block_n=16, block_k=256, splits=1, stages=4),
    "n32_k256": dict(block_n=32, block_k=256, splits=1, stages=4),
    "n128": dict(block_n=128),
    "k128": dict(block_k=128),
    "warps8": dict(warps=8),
    "stages4": dict(stages=4),
}


def decode_products(cfg) -> list[tuple[str, int, int, int, bool]]:
  """(name, K, N, times a decode step runs it, transposed) of each product of model config
  `cfg` in the GPU sampler's decode step (models/decoder.py `BlockStack.unroll` joins q / k /
  v and gate / up; a tied LM head multiplies by the `[vocab, d]` table transposed)."""
  d, layers = cfg.d_model, cfg.num_layers
  head_dim = cfg.head_dim or d // cfg.num_heads
  gated = cfg.activation in ("swiglu", "geglu")
  return [
      ("qkv", d, (cfg.num_heads + 2 * cfg.num_kv_heads) * head_dim, layers, False),
      ("o", cfg.num_heads * head_dim, d, layers, False),
      ("gate_up" if gated else "up", d, (2 if gated else 1) * cfg.mlp_dim, layers, False),
      ("down", cfg.mlp_dim, d, layers, False),
      ("head", d, cfg.vocab_size, 1, bool(cfg.tie_embeddings)),
  ]


def _weights(k: int, n: int, transposed: bool, weights: str, dtype, key) -> tuple:
  """(w, scale or None) of one random product weight as the sampler holds it."""
  w = jax.random.normal(key, (n, k) if transposed else (k, n), jnp.float32) / np.sqrt(k)
  if weights != "int8":
    return w.astype(dtype), None
  q = quantize_int8(w, (1,) if transposed else (0,), dtype)
  return q.q, q.scale.reshape(-1)


def _xla_product(x, w, scale, transposed: bool):
  """What models/layers.py `dense` (and the tied head) compile to without the kernel."""
  dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  if scale is None:
    return jax.lax.dot_general(x, w, dims)
  y = jax.lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=jnp.float32)
  return (y * scale).astype(x.dtype)


def time_product(fn, x, ws, scales, repeats: int, options) -> float:
  """Median seconds of one product: a jitted call running `fn` on every copy, over copies."""
  def run(x, ws, scales):
    return [fn(x, w, s) for w, s in zip(ws, scales)]
  compiled = jax.jit(run).lower(x, ws, scales).compile(options)
  jax.block_until_ready(compiled(x, ws, scales))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x, ws, scales))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / len(ws)


def check(preset: str = "1b", *, rows: int = 32, dtype: str = "bfloat16",
          weights: str = "compute", variants: tuple[str, ...] = tuple(VARIANTS),
          stream_mib: int = 512, max_copies: int = 64, repeats: int = 5,
          interpret: bool = False) -> dict[str, Any]:
  """Times every decode product of `preset`'s model each way (module doc)."""
  cfg = pretrain.get_config(preset).model
  on_gpu = jax.devices()[0].platform == "gpu"
  if not (on_gpu or interpret):
    raise ValueError("the kernel runs on a GPU (or --interpret, whose times mean nothing)")
  # As the sampler compiles its step: no dot merger (it would join the copies' products
  # into one GEMM over concatenated weights), XLA's Triton GEMMs for int8 weights on GPU.
  options = dict(compiler_options(GPU_FLAGS) if on_gpu else {}, **SAMPLER_COMPILER_OPTIONS,
                 **(GPU_INT8_COMPILER_OPTIONS if on_gpu and weights == "int8" else {}))
  key = jax.random.PRNGKey(0)
  results = []
  for name, k, n, count, transposed in decode_products(cfg):
    w, scale = _weights(k, n, transposed, weights, dtype, jax.random.fold_in(key, k * n))
    nbytes = w.size * w.dtype.itemsize + (0 if scale is None else scale.size * 4)
    copies = int(min(max_copies, max(1, -(-stream_mib * 2**20 // nbytes))))
    ws = [w + 0 if i else w for i in range(copies)]  # distinct buffers
    scales = [scale] * copies
    xk = jax.random.normal(jax.random.fold_in(key, k), (rows, k), jnp.float32).astype(dtype)
    row = dict(name=name, k=k, n=n, count=count, transposed=transposed, weight_bytes=nbytes,
               copies=copies)
    row["xla_s"] = time_product(lambda x, w, s: _xla_product(x, w, s, transposed), xk, ws,
                                scales, repeats, options)
    for variant in variants:
      kw = dict(VARIANTS[variant], transposed=transposed, interpret=interpret)
      tiling = decode_gemm.plan(rows, k, n, weight_bytes=w.dtype.itemsize,
                                **{a: kw[a] for a in ("block_n", "block_k") if a in kw})
      kw.setdefault("splits", tiling.splits)
      if (k // tiling.block_k) % kw["splits"]:
        continue
      row[f"{variant}_s"] = time_product(
          lambda x, w, s, kw=kw: decode_gemm.skinny_dot(x, w, s, **kw), xk, ws, scales,
          repeats, options)
      row[f"{variant}_tiling"] = [tiling.block_n, tiling.block_k, kw["splits"]]
    results.append(row)
    del ws
  bandwidth = bandwidth_figures(1 << 30 if on_gpu else 1 << 26)
  ways = ["xla"] + [v for v in variants if all(f"{v}_s" in r for r in results)]
  step = {way: sum(r[f"{way}_s"] * r["count"] for r in results) for way in ways}
  step_bytes = sum(r["weight_bytes"] * r["count"] for r in results)
  return dict(preset=preset, rows=rows, dtype=dtype, weights=weights, interpret=interpret,
              device_kind=jax.devices()[0].device_kind, products=results, step_s=step,
              step_weight_bytes=step_bytes, **bandwidth)


def format_check(r: dict[str, Any]) -> str:
  peak = r["memory_bandwidth"]
  util = lambda nbytes, s: f"{nbytes / s / 1e9:7.0f} GB/s {100 * nbytes / s / peak:5.1f}%"
  lines = [f"{r['device_kind']}: {r['preset']} decode products, {r['rows']} rows, {r['dtype']}"
           + (" with int8 weights" if r["weights"] == "int8" else "")
           + f"; bandwidth {peak / 1e12:.2f} TB/s ({r['bandwidth_source']})"
           + ("; INTERPRETER: times mean nothing" if r["interpret"] else "")]
  for p in r["products"]:
    lines.append(f"{p['name']:8s} [{p['k']} x {p['n']}]{' T' if p['transposed'] else ''} "
                 f"{p['weight_bytes'] / 2**20:.1f} MiB x {p['count']}, {p['copies']} copies")
    for way in ["xla"] + [k[:-2] for k in p if k.endswith("_s") and k != "xla_s"]:
      tiling = p.get(f"{way}_tiling")
      lines.append(f"  {way:9s} {p[f'{way}_s'] * 1e6:9.1f} us {util(p['weight_bytes'], p[f'{way}_s'])}"
                   + (f"  (block_n {tiling[0]}, block_k {tiling[1]}, splits {tiling[2]})"
                      if tiling else ""))
  lines.append("decode step's products (each layer's four, the head once):")
  for way, s in r["step_s"].items():
    lines.append(f"  {way:9s} {s * 1e3:9.3f} ms {util(r['step_weight_bytes'], s)}")
  return "\n".join(lines)


def define_flags() -> None:
  """The script's flags, defined when it runs (tests import it beside scripts.decode_check,
  whose flags share names)."""
  flags.DEFINE_string("preset", "1b", "configs/pretrain.py preset of the model.")
  flags.DEFINE_integer("rows", 32, "Rows a product (prompts decoded together).")
  flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_enum("weights", "compute", ["compute", "int8"],
                    "The weights in the compute dtype or int8.")
  flags.DEFINE_list("variants", list(VARIANTS), "Kernel tilings to time.")
  flags.DEFINE_integer("repeats", 5, "Timed calls a way (median).")
  flags.DEFINE_bool("interpret", False, "Pallas's interpreter (CPU; times mean nothing).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  unknown = sorted(set(f.variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
  result = check(f.preset, rows=f.rows, dtype=f.dtype, weights=f.weights,
                 variants=tuple(f.variants), repeats=f.repeats, interpret=f.interpret)
  print(format_check(result))
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""XLA settings per platform, set in one place before the backend starts.

XLA reads `XLA_FLAGS` (and libtpu `LIBTPU_INIT_ARGS`) once, when the backend starts, not when
jax is imported; so the entry points (scripts/train.py, scripts/benchmark.py) call
`apply_xla_settings()` first thing in `main`. The platform is decided from the environment and
the attached hardware (parallel/platforms.py), never by starting a backend.

What each platform gets, and why:

- **GPU** (`GPU_FLAGS`): the latency-hiding scheduler, which orders each layer's FSDP
  all-gathers and reduce-scatters to overlap with the previous layer's matmuls (without it they
  run back to back with compute on the same stream); pipelined all-gather / reduce-scatter /
  all-reduce in the scanned layer loop (the next layer's weights arrive while this one computes)
  and double-buffered while loops, which that pipelining needs; collective combining up to
  128 MiB (fewer, larger NCCL calls); cuBLAS instead of Triton for the big GEMMs (faster for the
  transformer shapes on H100 / H200). Memory: JAX preallocates 75% of the GPU at start
  (`XLA_PYTHON_CLIENT_MEM_FRACTION`); a training job alone on its GPUs can take
  `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`, a job sharing them (a notebook beside it, a rollout
  server) should lower it or set `XLA_PYTHON_CLIENT_PREALLOCATE=false`. Neither is set here:
  the right value depends on what else runs on the GPU.
- **CPU**: nothing for training and tests (their numerics stay XLA's default). The benchmark
  adds `CPU_BENCHMARK_FLAGS` and its host allocator (scripts/benchmarks/host_allocator.py), on
  CPU only.
- **TPU**: nothing: libtpu's defaults already schedule collectives asynchronously.

A flag the user already set (in `XLA_FLAGS`, by name) is never overridden; `apply_xla_settings`
only adds the missing ones. Every flag here is known to the installed jaxlib (XLA aborts on an
unknown flag): tests/parallel/test_xla_settings.py starts a backend with all of them.
"""

from __future__ import annotations

import os
from typing import MutableMapping

from parallel.platforms import gpu_attached, tpu_chips_attached

_MIB = 1 << 20

GPU_FLAGS: tuple[str, ...] = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    f"--xla_gpu_all_reduce_combine_threshold_bytes={128 * _MIB}",
    f"--xla_gpu_all_gather_combine_threshold_bytes={128 * _MIB}",
    f"--xla_gpu_reduce_scatter_combine_threshold_bytes={128 * _MIB}",
    "--xla_gpu_enable_triton_gemm=false",
)

# An empty YNNPACK fusion type sends every dot to XLA:CPU's Eigen GEMMs instead of YNNPACK: the
# big 2-D GEMMs run at the same rate either way, but YNNPACK runs attention's small batched GEMMs
# on about one core (README, "Benchmarks", has the figures). Benchmark only.
CPU_BENCHMARK_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)

PLATFORMS = ("cpu", "gpu", "tpu")


def target_platform(environ: MutableMapping[str, str] | None = None) -> str:
  """The platform JAX will start on: 'cpu', 'gpu' or 'tpu', without starting a backend.

  `JAX_PLATFORMS` decides when set (its first entry; 'cuda' / 'rocm' count as 'gpu'); else a
  TPU chip on the PCI bus means 'tpu', a GPU device file 'gpu', and anything else 'cpu'.
  """
  environ = os.environ if environ is None else environ
  wanted = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if wanted:
    return "gpu" if wanted in ("cuda", "rocm", "gpu") else ("tpu" if wanted == "tpu" else "cpu")
  if tpu_chips_attached():
    return "tpu"
  return "gpu" if gpu_attached() else "cpu"


def flags_for(platform: str, *, benchmark: bool = False) -> tuple[str, ...]:
  """The XLA flags `platform` gets (with `benchmark`, the benchmark's CPU extras too)."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform {platform!r}: one of {PLATFORMS}")
  if platform == "gpu":
    return GPU_FLAGS
  if platform == "cpu" and benchmark:
    return CPU_BENCHMARK_FLAGS
  return ()


def compiler_options(flags: tuple[str, ...]) -> dict[str, bool | int | str]:
  """`--name=value` XLA flags as `compile()` options: a program compiled ahead of time for
  another platform (parallel/gpu_target.py) gets the flags a run there would start with,
  whatever XLA_FLAGS this process has."""
  def value(text):
    return {"true": True, "false": False}.get(text, int(text) if text.isdigit() else text)
  return {name: value(v) for name, v in (flag.lstrip("-").split("=", 1) for flag in flags)}


def add_flags(current: str, wanted: tuple[str, ...]) -> str:
  """`current` XLA_FLAGS plus each of `wanted` whose flag name it does not already set."""
  present = {f.split("=")[0] for f in current.split()}
  extra = [f for f in wanted if f.split("=")[0] not in present]
  return " ".join([current.strip(), *extra]).strip()


def apply_xla_settings(platform: str | None = None, *, benchmark: bool = False,
                       environ: MutableMapping[str, str] | None = None) -> str:
  """Adds `platform`'s flags (default: `target_platform()`) to `XLA_FLAGS`; returns the
  platform. Call before the first JAX computation (XLA reads the variable when it starts)."""
  environ = os.environ if environ is None else environ
  platform = platform or target_platform(environ)
  merged = add_flags(environ.get("XLA_FLAGS", ""), flags_for(platform, benchmark=benchmark))
  if merged:
    environ["XLA_FLAGS"] = merged
  return platform

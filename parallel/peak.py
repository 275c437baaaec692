"""Peak FLOP/s of the devices, the denominator of MFU, and their memory bandwidth, the
denominator of decoding's bandwidth utilisation.

Accelerators: vendor dense peaks for the compute dtype. CPUs have no such number, so we measure
the float32 matmul rate of this machine (the benchmark does the same, in the same run).

A property of the hardware, like the rest of this package's view of the devices, so training's
progress line (training/loop.py) and the benchmarks (scripts/benchmarks/) both take it from
here. Unlike parallel/platforms.py, which must not start a backend, measuring runs a matmul.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s per chip for bfloat16 matmuls, vendor specifications, matched
# against `device.device_kind` in this order (the first name it contains wins, so the more
# specific names come first: "NVIDIA H100 PCIe" before the SXM "NVIDIA H100 80GB HBM3").
_BF16_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H20": 148e12,
    "B200": 2250e12, "B100": 1750e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10G": 70e12,
}


# Peak memory bandwidth (bytes/s) per chip, vendor specifications, matched as _BF16_PEAKS: the
# denominator of decoding's bandwidth utilisation beside the rate measured in the same run.
_MEMORY_BANDWIDTH = {
    "TPU v4": 1.2e12, "TPU v5 lite": 819e9, "TPU v5e": 819e9, "TPU v5p": 2.765e12,
    "TPU v5": 2.765e12, "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12, "TPU7x": 7.37e12,
    "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "H20": 4.0e12,
    "B200": 8.0e12, "B100": 8.0e12, "A100": 2.039e12, "L40S": 864e9, "L4": 300e9,
    "A10G": 600e9,
}


def published_memory_bandwidth(device_kind: str) -> float | None:
  """The vendor's peak memory bandwidth (bytes/s) of a chip named `device_kind`, or None."""
  for name, rate in _MEMORY_BANDWIDTH.items():
    if name.lower() in device_kind.lower():
      return rate
  return None


def measure_memory_bandwidth(nbytes: int = 1 << 28, repeats: int = 10,
                             device: jax.Device | None = None) -> float:
  """Sustained bytes/s of streaming memory on one device: `y = x * 2 + 1` over `nbytes` of
  float32, which reads `x` once and writes `y` once (2 x nbytes moved), the access pattern of
  a decode step's weight and cache reads. The best of `repeats` timed calls."""
  device = device or jax.local_devices()[0]
  x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
  stream = jax.jit(lambda x: x * 2.0 + 1.0)
  stream(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    stream(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * (nbytes // 4) * 4 / best


def published_peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """The vendor's dense peak FLOP/s of a chip named `device_kind` for `dtype` matmuls, or None
  for a chip not in the table (CPUs among them). float32 counts half the bf16 rate (TPUs run
  float32 matmuls as several bf16 passes; GPUs as TF32, half the bf16 rate)."""
  for name, peak in _BF16_PEAKS.items():
    if name.lower() in device_kind.lower():
      return peak / (1 if dtype in ("bfloat16", "float16") else 2)
  return None


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10,
                         device: jax.Device | None = None) -> float:
  """Sustained FLOP/s of an `n x n @ n x n` matmul chain on one device."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype) / n, device)

  @jax.jit
  def chain(x):
    for _ in range(4):
      x = x @ a
    return x

  chain(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    chain(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 4 * 2 * n ** 3 / best


def device_peak_flops(dtype: str = "bfloat16") -> float:
  """Peak FLOP/s of one local device: the vendor number when known, else measured."""
  device = jax.local_devices()[0]
  if device.platform != "cpu":
    peak = published_peak_flops(getattr(device, "device_kind", ""), dtype)
    if peak is not None:
      return peak
  return measure_matmul_flops(n=1024, repeats=3)


def total_peak_flops(dtype: str = "bfloat16") -> float:
  """Peak FLOP/s of all devices of the job. CPU devices (real or faked with
  --xla_force_host_platform_device_count) share one host's cores: the measured host rate."""
  if jax.devices()[0].platform == "cpu":
    return device_peak_flops(dtype)
  return device_peak_flops(dtype) * jax.device_count()

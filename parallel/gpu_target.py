"""Compile for a GPU that is not here: compile-only devices from JAX's CUDA plugin.

XLA:GPU compiles without a GPU when it is told the target's device facts (a
`stream_executor.GpuTargetConfigProto`, the text below); JAX's CUDA PJRT plugin then hands out
compile-only devices, as libtpu does for TPU topologies (parallel/tpu_topology.py). What the
program reads, how it fuses, which kernels it launches, are then those the GPU would run;
only GEMM autotuning, which needs the device, is skipped (XLA's default choices stand in).

Needs the plugin, without the CUDA libraries: `pip install -e .[gpu_aot]` (jax[cuda12-local],
at the installed jax's version). JAX itself stays on the CPU (`JAX_PLATFORMS=cpu`).
scripts/decode_check.py compiles the sampler this way, and scripts/compile_check.py every
program of a stage for a GPU cluster (`GpuTarget`: `h200:8` one host of eight GPUs,
`h100:4x8` four hosts of eight).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from jax.experimental import topologies

# name -> (SM count, HBM bytes, bandwidth bytes/s, clock GHz, L2 bytes, device name). The
# published figures of the SXM parts.
GPU_SPECS: dict[str, tuple[int, int, float, float, int, str]] = {
    "h100": (132, 85_520_809_984, 3.35e12, 1.98, 52_428_800, "NVIDIA H100 80GB HBM3"),
    "h200": (132, 151_397_597_184, 4.8e12, 1.98, 52_428_800, "NVIDIA H200 141GB HBM3e"),
}


def target_config(name: str) -> str:
  """The GpuTargetConfigProto text of GPU `name` (a GPU_SPECS key): Hopper, sm_90."""
  if name not in GPU_SPECS:
    raise ValueError(f"unknown GPU {name!r}; choose one of {sorted(GPU_SPECS)}")
  sms, memory, bandwidth, clock, l2, device = GPU_SPECS[name]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{device}"
"""


def cuda_plugin_installed() -> bool:
  """Whether JAX's CUDA 12 PJRT plugin is installed (it makes the compile-only devices)."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def gpu_devices(name: str, count: int = 1) -> list:
  """`count` compile-only devices of GPU `name` on one host."""
  return gpu_target_devices(GpuTarget(name, 1, count))


# JAX's allocator takes this fraction of a GPU's memory at start unless told otherwise.
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """GPU hosts to compile for: `hosts` machines of `per_host` GPUs of kind `name`."""
  name: str
  hosts: int
  per_host: int
  mem_fraction: float = DEFAULT_MEM_FRACTION

  @property
  def gpus(self) -> int:
    return self.hosts * self.per_host

  @property
  def hbm_bytes(self) -> int:
    """A program's budget per GPU: the share of its memory JAX's allocator takes."""
    return int(GPU_SPECS[self.name][1] * self.mem_fraction)

  def __str__(self) -> str:
    hosts = f"{self.hosts} hosts x {self.per_host}" if self.hosts > 1 else f"{self.per_host}"
    return (f"{self.name}:{self.hosts}x{self.per_host} ({hosts} {GPU_SPECS[self.name][5]}; "
            f"{self.mem_fraction:g} of each GPU's memory, XLA_PYTHON_CLIENT_MEM_FRACTION)")


def parse_gpu_target(text: str, environ=None) -> GpuTarget | None:
  """`h200:8` (one host of 8), `h200:16` (8 a host), `h100:4x8` (4 hosts of 8) as a
  `GpuTarget`; None when `text` names no GPU (a TPU topology). The memory fraction is the
  run's own: XLA_PYTHON_CLIENT_MEM_FRACTION when set, else JAX's default."""
  name, _, shape = text.lower().partition(":")
  if name not in GPU_SPECS:
    return None
  match = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape or "1")
  if match is None:
    raise ValueError(f"GPU target {text!r}: expected {name}:GPUS or {name}:HOSTSxGPUS")
  hosts, gpus = match.group(1), int(match.group(2))
  if hosts is None:  # a count: whole hosts of up to eight
    hosts, gpus = (gpus // 8, 8) if gpus > 8 and gpus % 8 == 0 else (1, gpus)
  environ = os.environ if environ is None else environ
  fraction = float(environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
  if gpus > 8 or gpus < 1 or int(hosts) < 1:
    raise ValueError(f"GPU target {text!r}: 1 to 8 GPUs a host ({name}:HOSTSxGPUS)")
  return GpuTarget(name, int(hosts), gpus, fraction)


def gpu_target_devices(target: GpuTarget) -> list:
  """The compile-only devices of `target`, every host's."""
  if not cuda_plugin_installed():
    raise RuntimeError("compiling for a GPU here needs JAX's CUDA plugin: "
                       "pip install -e .[gpu_aot]")
  topology = topologies.get_topology_desc(
      target.name, "cuda", target_config=target_config(target.name),
      topology=f"1x{target.hosts}x{target.per_host}")
  return list(topology.devices)

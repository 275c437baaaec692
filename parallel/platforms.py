"""Which accelerators this machine has, and keeping JAX off a TPU runtime that has no TPU.

With `libtpu` installed (`pip install -e .[tpu]`, which scripts/compile_check.py needs to compile
for TPU topologies on any machine), JAX's default backend search loads libtpu even where no TPU
is attached: it costs start-up time (docs/scale_out.md) and prints libtpu's start-up errors
on every run.
`avoid_tpu_probe()` (run when `parallel` is imported, before any backend starts) limits the search
to the CPU in exactly the case where JAX would end up on the CPU anyway; a TPU VM, a GPU machine,
an installed PJRT plugin (but a GPU one without a GPU), or an explicit `JAX_PLATFORMS` leave
JAX's choice untouched.

Hardware is detected from /sys and /dev only, never by starting a backend.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v2/v3, v4, v5p, v5e, v6e, 7x), as JAX's own hardware detection.
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def tpu_chips_attached() -> int:
  """Number of TPU chips on this machine's PCI bus (0 off a TPU VM)."""
  chips = 0
  for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_path) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor_path), "device")) as f:
        chips += f.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      continue
  return chips


def gpu_attached() -> bool:
  """True if an NVIDIA or AMD GPU device file exists."""
  return any(os.path.exists(path) for path in _GPU_DEVICE_FILES)


# PJRT plugins that serve only a GPU: without a GPU device file JAX fails to start them and
# stays on the CPU (the CUDA plugin is installed on CPU machines to compile for a GPU,
# parallel/gpu_target.py), so they do not count as another platform JAX might pick.
_GPU_PLUGINS = ("xla_cuda", "xla_rocm")


def _pjrt_plugins_installed() -> bool:
  """Whether a PJRT plugin other than a GPU one is installed (`_GPU_PLUGINS`)."""
  other = lambda name: not name.startswith(_GPU_PLUGINS)
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    if any(other(m.name) for m in pkgutil.iter_modules(spec.submodule_search_locations)):
      return True
  from importlib.metadata import entry_points  # pylint: disable=g-import-not-at-top
  return any(other(ep.name) for ep in entry_points(group="jax_plugins"))


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def avoid_tpu_probe() -> bool:
  """Pins JAX to the CPU when libtpu is installed but nothing but a CPU is attached.

  Returns:
    Whether the platform list was set (False: JAX's own choice stands).
  """
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return False
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    return False
  if tpu_chips_attached() or gpu_attached() or _pjrt_plugins_installed() or _backends_started():
    return False
  jax.config.update("jax_platforms", "cpu")
  return True

"""Device mesh from `config.mesh`: axes (data, fsdp, tensor) within a slice (ICI) and across
slices (DCN). A size of -1 fills with the remaining devices; with one device every axis is 1 and
the same code runs.

Device order follows the physical topology (`mesh_utils.create_device_mesh`, or
`create_hybrid_device_mesh` when the devices belong to several slices), so the innermost axis
(`tensor`, the most communication per step) lands on the closest chips. Fake CPU devices have
no topology and are laid out in id order, which puts each process's devices together.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from parallel.rules import MESH_AXES


def _fill(sizes: Sequence[int], total: int, what: str) -> list[int]:
  sizes = list(sizes)
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"{what}: axis sizes must be >= 1 or -1 (fill), got "
                     f"{dict(zip(MESH_AXES, sizes))}")
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"{what}: at most one axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(f"{what}: {total} devices do not divide by the fixed axes {sizes}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f"{what}: axis sizes {dict(zip(MESH_AXES, sizes))} need "
                     f"{math.prod(sizes)} devices, have {total}")
  return sizes


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int,
               num_slices: int = 1) -> tuple[list[int], list[int]]:
  """Resolves (ici_sizes, dcn_sizes) over MESH_AXES for `num_devices` in `num_slices`."""
  dcn = _fill([mesh_config[f"dcn_{a}"] for a in MESH_AXES], num_slices,
              f"config.mesh.dcn_* ({num_slices} slices; e.g. set dcn_data={num_slices})")
  ici = _fill([mesh_config[a] for a in MESH_AXES], num_devices // num_slices, "config.mesh")
  return ici, dcn


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; device order follows the physical topology."""
  devices = list(jax.devices() if devices is None else devices)
  num_slices = 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)
  ici, dcn = mesh_shape(mesh_config, len(devices), num_slices)
  if devices[0].platform == "cpu":
    return Mesh(np.asarray(devices).reshape([i * d for i, d in zip(ici, dcn)]), MESH_AXES)
  try:
    grid = _physical_mesh(ici, dcn, devices, num_slices, allow_split=False)
  except (ValueError, NotImplementedError, AssertionError):
    # Axis sizes that do not follow the chip grid (e.g. fsdp 64 x tensor 4 on a 16x16 slice)
    # need physical axes split between mesh axes; still correct, slightly less local.
    grid = _physical_mesh(ici, dcn, devices, num_slices, allow_split=True)
  return Mesh(grid, MESH_AXES)


def _physical_mesh(ici, dcn, devices, num_slices, *, allow_split: bool) -> np.ndarray:
  if num_slices > 1:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                allow_split_physical_axes=allow_split)
  return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=allow_split)

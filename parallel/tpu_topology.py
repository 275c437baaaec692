"""TPU topologies as compile targets: names, chip memory, and devices without the hardware.

`jax.experimental.topologies` with `libtpu` installed describes a TPU slice (its devices and
their physical coordinates) on any machine, so a train step can be compiled ahead of time for
a pod that is not attached and its memory read from the compiled program. Names accepted:

    v5e:16x16, v5p:4x4x4, v4:2x2x2, v6e:8x16     generation and chip grid (JAX's own names)
    v5litepod-256, v5e-256, v5p-128, v4-32, v6e-64  Cloud accelerator types (v4 and v5p count
                                                   TensorCores, two per chip; v5e, v6e chips)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from parallel.platforms import tpu_chips_attached

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str            # JAX topology prefix
  accelerator: str     # Cloud accelerator-type prefix
  hbm_gib: float       # HBM per chip (Cloud TPU system architecture pages)
  cores_per_chip: int  # TensorCores counted by the accelerator type
  grid_dims: int       # 2-D torus (v5e, v6e) or 3-D (v4, v5p)


GENERATIONS = {g.name: g for g in (
    Generation("v4", "v4", 32, 2, 3),
    Generation("v5e", "v5litepod", 16, 1, 2),
    Generation("v5p", "v5p", 95, 2, 3),
    Generation("v6e", "v6e", 32, 1, 2),
)}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """A TPU slice (or several joined over DCN) to compile for."""
  generation: Generation
  grid: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.grid)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    return f"{self.generation.name}:{'x'.join(map(str, self.grid))}"

  @property
  def accelerator_type(self) -> str:
    g = self.generation
    return f"{g.accelerator}-{self.chips_per_slice * g.cores_per_chip}"

  @property
  def hbm_bytes(self) -> int:
    return int(self.generation.hbm_gib * GIB)

  def __str__(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return f"{self.topology_name} ({self.accelerator_type}){slices}, {self.chips} chips"


def _default_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The usual slice shape for a chip count: 2-D 16 -> 4x4, 128 -> 8x16; 3-D 64 -> 4x4x4."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"no standard slice shape for {chips} chips")
  if dims == 2:
    rows = 1 << (int(math.log2(chips)) // 2)
    return (rows, chips // rows)
  grid = [1, 1, 1] if chips < 4 else [2, 2, 1]
  while math.prod(grid) < chips:
    smallest = min(grid)
    last = max(i for i, d in enumerate(grid) if d == smallest)
    grid[last] *= 2
  return tuple(grid)


def parse_topology(text: str, num_slices: int = 1) -> TpuTarget:
  """Parses `gen:AxB[xC]` or an accelerator type such as `v5litepod-256` or `v5p-128`.

  Raises:
    ValueError: an unknown generation, or a grid of the wrong rank.
  """
  text = text.strip().lower()
  match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
  if match:
    name, grid = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
  else:
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match:
      raise ValueError(f"topology {text!r}: expected gen:AxB[xC] (v5e:16x16) or an accelerator "
                       "type (v5p-128)")
    name, grid = match.group(1), None
  name = _ALIASES.get(name, name)
  if name not in GENERATIONS:
    raise ValueError(f"topology {text!r}: unknown TPU generation {name!r}; one of "
                     f"{sorted(GENERATIONS)}")
  generation = GENERATIONS[name]
  if grid is None:
    cores = int(match.group(2))
    if cores % generation.cores_per_chip:
      raise ValueError(f"{text!r}: {cores} is not a whole number of {name} chips")
    grid = _default_grid(cores // generation.cores_per_chip, generation.grid_dims)
  if len(grid) != generation.grid_dims:
    raise ValueError(f"topology {text!r}: {name} slices are {generation.grid_dims}-D grids")
  if num_slices < 1:
    raise ValueError(f"num_slices must be at least 1, got {num_slices}")
  return TpuTarget(generation, grid, num_slices)


def _quiet_libtpu(target: TpuTarget) -> None:
  # libtpu reads these on load; without them, off a TPU VM, it prints metadata-server errors.
  # Only the topology is described: no TPU runtime starts, so a run that holds the chips of a
  # TPU VM (libtpu's lock file) is not disturbed.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(target: TpuTarget) -> list:
  """The devices of `target`, described by libtpu; nothing runs on them, they compile.

  Raises:
    RuntimeError: libtpu is not installed (`pip install -e .[tpu]`).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise RuntimeError("compiling for a TPU topology needs libtpu: pip install -e .[tpu] "
                       "(or pip install libtpu)")
  if not tpu_chips_attached():
    _quiet_libtpu(target)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  description = topologies.get_topology_desc(
      topology_name=target.topology_name, platform="tpu",
      # v4 and v5p run "megacore": one JAX device per chip, its two TensorCores fused.
      chip_config_name="megacore" if target.generation.cores_per_chip == 2 else "default",
      # Four chips per host (2x2), as on Cloud TPU VMs; a lone chip is its own host.
      chips_per_host_bounds=(1, 1, 1) if target.chips_per_slice == 1 else (2, 2, 1),
      num_slices=target.num_slices)
  return list(description.devices)

"""Compiles a stage's real train step ahead of time for a TPU topology and checks it fits.

  python -m scripts.compile_check --config configs/pretrain.py:llama3_8b --topology v5e:16x16
  python -m scripts.compile_check --config configs/pretrain.py:llama3_8b --topology v5p-128 \\
      --config.data.global_batch_size=512 --config.mesh.fsdp=-1
  python -m scripts.compile_check --config configs/pretrain.py:llama3_8b --topology v5e:16x16 \\
      --num_slices 2 --config.mesh.dcn_data=2                                     # multi-slice
  python -m scripts.compile_check --config configs/pretrain.py:tiny               # this machine

No TPU is needed: libtpu (`pip install -e .[tpu]`) describes the topology's chips and compiles
for them while JAX itself stays on the CPU. The step is the one training runs (same model,
optimizer, mesh, logical-axis rules, donation, gradient accumulation), built from shapes only.
It prints the per-device memory of the compiled program (arguments, outputs, temporaries)
against the chip's HBM and exits with status 1 if it does not fit, 0 if it does.

`--topology` takes `gen:AxB[xC]` (v4, v5e, v5p, v6e) or an accelerator type (v5litepod-256,
v5p-128); without it the step is compiled for this machine's devices.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs.cli import parse_flags
from models.build import count_params
from parallel.rules import describe_layout
from parallel.tpu_topology import parse_topology, topology_devices
from training.registry import get_stage
from training.setup import build_setup

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology (v5e:16x16, v5p-128, ...); "
                                "empty: this machine's devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN; "
                                   "set config.mesh.dcn_* to match (e.g. dcn_data).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Memory budget per device in GiB (default: the "
                              "chip's HBM; required without --topology to get a verdict).")
_PRINT_LAYOUT = flags.DEFINE_bool("print_layout", False, "Print every parameter's sharding.")
flags.mark_flags_as_required(["config"])

GIB = 1 << 30


def abstract_batch(config, stage) -> dict[str, Any]:
  """Shapes and dtypes of one global batch of `stage` (no data is read).

  A stage may define `abstract_batch(config)`; the text stages share the packed-row layout.
  """
  if getattr(stage, "abstract_batch", None) is not None:
    return stage.abstract_batch(config)
  if stage.name not in ("clm",):
    raise NotImplementedError(f"stage {stage.name!r} has no abstract_batch(config) yet")
  shape = (config.data.global_batch_size, config.data.seq_len)
  dtypes = dict(inputs=jnp.int32, targets=jnp.int32, loss_mask=jnp.float32,
                segment_ids=jnp.int32, positions=jnp.int32)
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, dtype in dtypes.items()}


def lower_train_step(config, devices: Sequence[Any] | None = None):
  """Lowers the train step of `config` for `devices` (default: this machine's) from shapes.

  The run is built by training/setup.py like a training run's, LoRA adapters and frozen models
  (a LoRA base, a reference, a teacher) included, as sharded shapes only.

  Returns:
    (lowered, setup): `jax.stages.Lowered` and the training/setup.py RunSetup.
  """
  setup = build_setup(config, get_stage(config.objective.name), devices=devices)
  frozen = setup.load_frozen(abstract=True)
  step = setup.train_step(frozen)
  batch = abstract_batch(config, setup.stage)
  data_sharding = setup.data_sharding
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data_sharding),
                       batch)
  return step.lower(setup.abstract_state, batch, frozen.params), setup


def device_memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program, from `compiled.memory_analysis()`.

  `total` is what must fit in one device's memory while the step runs: arguments, temporaries,
  generated code, and outputs except those written into donated arguments (`alias`).
  """
  analysis = compiled.memory_analysis()
  get = lambda name: int(getattr(analysis, name, 0) or 0)
  out = dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
             alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
             code=get("generated_code_size_in_bytes"))
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return out


def argument_bytes(tree: Any) -> int:
  """Bytes of one device's shards of a pytree of sharded ShapeDtypeStructs."""
  return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


_OOM = re.compile(r"Ran out of memory (?:in memory space (\w+)|on (HBM))")
_OOM_SIZES = re.compile(r"\(([\d.]+)([KMGT])\)[^(]*\(([\d.]+)([KMGT])\)")


def _parse_out_of_memory(message: str) -> dict[str, Any] | None:
  """What the TPU compiler's out-of-memory error says, or None for any other error.

  Returns:
    {memory: 'hbm' or 'vmem' (on-chip scratch, when one fusion is too big), needed and
    available bytes (0 when not stated), message: the error's first line}.
  """
  match = _OOM.search(message)
  if match is None:
    return None
  line = message[match.start():].splitlines()[0].strip()
  sizes = _OOM_SIZES.search(line)
  unit = lambda u: 1 << (10 * "KMGT".index(u) + 10)
  needed, available = ((int(float(sizes.group(1)) * unit(sizes.group(2))),
                        int(float(sizes.group(3)) * unit(sizes.group(4)))) if sizes
                       else (0, 0))
  return dict(memory=(match.group(1) or match.group(2)).lower(), needed=needed,
              available=available, message=line[:300])


def remat_peak_memory(config, policies: Sequence[str] = ("none", "full", "save_dots"),
                      devices: Sequence[Any] | None = None) -> dict[str, dict[str, int]]:
  """Compiled per-device memory of `config`'s train step under each remat policy.

  Returns:
    {policy: device_memory(...)}; `temp` is the activation memory that remat trades for compute.
  """
  results = {}
  for policy in policies:
    variant = config.copy_and_resolve_references()
    variant.model.remat = policy
    lowered, _ = lower_train_step(variant, devices)
    results[policy] = device_memory(lowered.compile())
  return results


def _gib(n: int) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"


def check(config, *, topology: str = "", num_slices: int = 1, hbm_gib: float | None = None,
          print_layout: bool = False, out=sys.stdout) -> dict[str, Any]:
  """Compiles `config`'s train step for `topology` and reports its memory; see the module doc.

  Returns:
    A summary dict (also printed as the last line, JSON) with `fits` True / False / None.
  """
  say = lambda text, end="\n": print(text, file=out, flush=True, end=end)
  devices, budget, target_name = None, None, "this machine"
  if topology:
    target = parse_topology(topology, num_slices)
    devices = topology_devices(target)
    budget, target_name = target.hbm_bytes, str(target)
  if hbm_gib:
    budget = int(hbm_gib * GIB)
  start = time.perf_counter()
  lowered, setup = lower_train_step(config, devices)
  try:
    memory = device_memory(lowered.compile())
    refused = None
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler itself refuses a program whose buffers exceed the usable HBM, or one
    # whose fusion needs more on-chip VMEM than there is.
    refused = _parse_out_of_memory(str(e))
    if refused is None:
      raise
    memory = dict(argument=argument_bytes(setup.abstract_state), temp=refused["needed"])
    if refused["available"]:
      budget = refused["available"]
  seconds = time.perf_counter() - start
  mesh, spec = setup.mesh, setup.spec
  device = mesh.devices.flat[0]
  params = count_params(spec.shapes)
  state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(setup.abstract_state))

  say(f"target      {target_name}: {mesh.size} x {device.device_kind}"
      + (f", {_gib(budget)} per device" if budget else ""))
  say(f"mesh        {dict(mesh.shape)}, rules {config.mesh.rules!r}; batch "
      f"{config.data.global_batch_size} x {config.data.seq_len}, grad_accum "
      f"{config.train.grad_accum_steps}, remat {config.model.remat!r}, scan_layers "
      f"{config.model.scan_layers}, compute {config.model.dtype}")
  say(f"model       {params / 1e9:.3f} B params; train state {_gib(state_bytes)} in all")
  if refused:
    say(f"compiled    refused after {seconds:.1f} s: {refused['message']}")
    if refused["memory"] == "hbm":
      say(f"per device  train state {_gib(memory['argument'])}, temporaries "
          f"{_gib(memory['temp'])} needed of {_gib(budget)} usable: DOES NOT FIT")
    else:
      say(f"per device  train state {_gib(memory['argument'])}; one fusion does not fit the "
          f"chip's {refused['memory']}: DOES NOT FIT (fewer rows or heads per device)")
    fits = False
  else:
    say(f"compiled    in {seconds:.1f} s")
    say(f"per device  arguments {_gib(memory['argument'])}, outputs {_gib(memory['output'])} "
        f"({_gib(memory['alias'])} into donated arguments), temporaries "
        f"{_gib(memory['temp'])}, code {_gib(memory['code'])}")
    fits = None if budget is None else memory["total"] <= budget
    verdict = "" if budget is None else (
        f" of {_gib(budget)} ({100 * memory['total'] / budget:.0f}%): "
        + ("fits" if fits else "DOES NOT FIT"))
    say(f"total       {_gib(memory['total'])}{verdict}")
  if print_layout:
    say(describe_layout(spec.logical_axes, setup.abstract_state["params"]), end="")
  summary = dict(target=topology or "local", num_slices=num_slices, devices=mesh.size,
                 mesh=dict(mesh.shape), batch=config.data.global_batch_size,
                 seq_len=config.data.seq_len, params=params, compile_seconds=round(seconds, 1),
                 budget=budget, fits=fits, refused=bool(refused),
                 **{f"{k}_bytes": v for k, v in memory.items()})
  say(json.dumps(summary))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TOPOLOGY.value:
    # Compile for the topology only: JAX's own backend stays on the CPU even on a TPU VM, so
    # the check never touches (or waits for) chips a training run may hold.
    jax.config.update("jax_platforms", "cpu")
  summary = check(_CONFIG.value, topology=_TOPOLOGY.value, num_slices=_NUM_SLICES.value,
                  hbm_gib=_HBM_GIB.value, print_layout=_PRINT_LAYOUT.value)
  sys.exit(1 if summary["fits"] is False else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

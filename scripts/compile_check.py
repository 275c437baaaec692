"""Compiles every program of a stage ahead of time for a TPU topology and checks that it fits.

  python -m scripts.compile_check --config configs/pretrain.py:llama3_8b --topology v5e:16x16
  python -m scripts.compile_check --config configs/dpo.py:llama3_8b --topology v5p-128 \\
      --config.objective.reference_mode=in_step --find_batch
  python -m scripts.compile_check --config configs/ppo.py:1b --topology v5e-8 \\
      --config.reward.model=runs/rm --frozen reward_model=1b               # PPO: four models
  python -m scripts.compile_check --config configs/distill.py:1b_from_8b --topology v5p-128 \\
      --frozen teacher=llama3_8b                                     # no teacher run here
  python -m scripts.compile_check --config configs/pretrain.py:llama3_8b --topology h100:2x8
  python -m scripts.compile_check --config configs/pretrain.py:tiny               # this machine

No TPU is needed: libtpu (`pip install -e .[tpu]`) describes the topology's chips and compiles
for them while JAX itself stays on the CPU. Nor a GPU: `--topology h200:8` (a host of eight),
`h100:4x8` (four hosts of eight) compile through JAX's CUDA plugin (`pip install -e
.[gpu_aot]`, parallel/gpu_target.py) under the XLA flags a GPU run gets, against the share of
each GPU's memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default: set
it as the run will). The programs are the ones training runs
(training/programs.py: the train step of every stage, the cached-reference pass, and the RL
sampler, reward-model and log-prob passes), built from shapes only. For each it prints

  memory   per device, from the compiled program: arguments, temporaries, outputs, code; plus
           the buffers that stay resident while it runs but are not its arguments (the params
           of the other models, the optimizer state): its peak, against the chip's HBM
  flops    XLA's cost analysis of the compiled program against the model FLOPs the benchmark
           counts (models/flops.py), both counting a loop body once: the ratio shows what
           remat recomputes (and what the model count leaves out)
  mesh     its collectives (parallel/hlo_stats.py): what the mesh costs

and the stage's verdict: it fits if every program fits. Exit status 1 if it does not, else 0.
`--find_batch` searches the largest batch that fits by compiling (doubling, then bisecting
over multiples of what keeps the batch whole on the mesh) and reports the compiles it took.

`--topology` takes `gen:AxB[xC]` (v4, v5e, v5p, v6e) or an accelerator type (v5litepod-256,
v5p-128); without it the programs are compiled for this machine's devices.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from configs.cli import parse_flags
from parallel.gpu_target import gpu_target_devices, parse_gpu_target
from parallel.hlo_stats import collective_stats
from parallel.kernel_stats import gpu_traffic
from parallel.rules import describe_layout
from parallel.tpu_topology import parse_topology, topology_devices
from parallel.xla_settings import GPU_FLAGS, compiler_options
from training.programs import batch_knob, batch_unit, stage_programs
from training.registry import get_stage
from training.setup import build_setup

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology (v5e:16x16, v5p-128, ...), or "
                                "GPUs (h200:8, h100:4x8: hosts x GPUs); empty: this machine's "
                                "devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN; "
                                   "set config.mesh.dcn_* to match (e.g. dcn_data).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Memory budget per device in GiB (default: the "
                              "chip's HBM; required without --topology to get a verdict).")
_FIND_BATCH = flags.DEFINE_bool("find_batch", False, "Search the largest batch that fits.")
_FROZEN = flags.DEFINE_multi_string("frozen", [], "name=preset: a frozen model (teacher, "
                                    "reference, reward_model) as a configs/models.py preset, "
                                    "when its run is not on this machine.")
_PROGRAMS = flags.DEFINE_list("programs", [], "Only these programs (default: all).")
_PRINT_LAYOUT = flags.DEFINE_bool("print_layout", False, "Print every parameter's sharding.")
flags.mark_flags_as_required(["config"])

GIB = 1 << 30
# Stands in for `init_from` when a stage needs a path (a frozen reference): never read.
SHAPES_ONLY = "compile_check:shapes-only"


def lower_train_step(config, devices: Sequence[Any] | None = None):
  """Lowers the supervised train step of `config` for `devices` from shapes.

  Returns:
    (lowered, setup): `jax.stages.Lowered` and the training/setup.py RunSetup.
  """
  stage = get_stage(config.objective.name)
  setup = build_setup(config, stage, devices=devices)
  frozen = setup.load_frozen(abstract=True)
  batch = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=setup.data_sharding)
           for k, a in stage.abstract_batch(config).items()}
  return setup.train_step(frozen).lower(setup.abstract_state, batch, frozen.params), setup


def device_memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program, from `compiled.memory_analysis()`.

  `total` is what must fit in one device's memory while the program runs: arguments,
  temporaries, generated code, and outputs except those written into donated arguments.
  """
  analysis = compiled.memory_analysis()
  get = lambda name: int(getattr(analysis, name, 0) or 0)
  out = dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
             alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
             code=get("generated_code_size_in_bytes"))
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return out


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


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float((analysis or {}).get("flops", 0.0))


def _options(stage) -> dict[str, Any] | None:
  """Compile options of the stage's devices: a GPU run's XLA flags when they are GPUs."""
  return compiler_options(GPU_FLAGS) if stage.mesh.devices.flat[0].platform == "gpu" else None


def measure(program, stage, budget: int | None) -> dict[str, Any]:
  """Compiles one training/programs.py Program; its memory, FLOPs, collectives and verdict.

  `peak` = the program's own total + the resident buffers it does not take as arguments.
  """
  start = time.perf_counter()
  other = sum(stage.resident_bytes(n) for n in program.resident if n not in program.uses)
  out = dict(name=program.name, what=program.what, other_resident=other)
  try:
    compiled = program.lower().compile(_options(stage))
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose buffers exceed the usable HBM, or one whose
    # fusion needs more on-chip VMEM than there is.
    refused = _parse_out_of_memory(str(e))
    if refused is None:
      raise
    out.update(refused=refused["message"], fits=False, seconds=time.perf_counter() - start,
               peak=refused["needed"] + other)
    return out
  memory = device_memory(compiled)
  devices = stage.mesh.size
  stats = collective_stats(compiled.as_text())
  out.update(memory, refused=None, seconds=time.perf_counter() - start,
             peak=memory["total"] + other, compiled_flops=_flops(compiled),
             model_flops=program.model_flops / devices,
             counted_flops=program.counted_flops / devices,
             collectives={op: dict(count=stats.count[op], bytes=stats.bytes[op])
                          for op in stats.count if stats.count[op]},
             collectives_text=stats.summary(), loops=stats.loops,
             unbounded_loops=stats.unbounded_loops)
  if _options(stage):  # GPU: what its kernels move (TPU's fusions are estimated too roughly)
    out["traffic"] = gpu_traffic(compiled.as_text(), stage.mesh.devices.flat[0].device_kind)
  out["fits"] = None if budget is None else out["peak"] <= budget
  return out


def _gib(n: int) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"


def _verdict(used: int, budget: int | None) -> str:
  if budget is None:
    return ""
  return (f" of {_gib(budget)} ({100 * used / budget:.0f}%): "
          + ("fits" if used <= budget else "DOES NOT FIT"))


def report_program(r: dict[str, Any], budget: int | None, say) -> None:
  say(f"program     {r['name']}: {r['what']}")
  if r["refused"]:
    say(f"  memory    refused by the compiler: {r['refused']}; with the resident buffers it "
        f"does not take ({_gib(r['other_resident'])}): DOES NOT FIT")
    return
  say(f"  memory    arguments {_gib(r['argument'])}, temporaries {_gib(r['temp'])}, outputs "
      f"{_gib(r['output'])} ({_gib(r['alias'])} into donated arguments), code "
      f"{_gib(r['code'])}: program {_gib(r['total'])}")
  say(f"            + resident, not its arguments {_gib(r['other_resident'])} = peak "
      f"{_gib(r['peak'])}{_verdict(r['peak'], budget)}")
  if r["compiled_flops"]:
    ratio = r["compiled_flops"] / r["counted_flops"] if r["counted_flops"] else float("nan")
    say(f"  flops     compiled {r['compiled_flops']:.3g} per device, model "
        f"{r['counted_flops']:.3g} (x{ratio:.2f}; both a loop body once); model per run "
        f"{r['model_flops']:.3g}")
  else:  # XLA:GPU's ahead-of-time compile reports no cost analysis
    say(f"  flops     model {r['counted_flops']:.3g} per device (a loop body once), "
        f"{r['model_flops']:.3g} per run; the compiler reports none")
  loops = (f" [{r['loops']} loops, {r['unbounded_loops']} without a constant bound: counted "
           "once]" if r["unbounded_loops"] else f" [{r['loops']} loops]" if r["loops"] else "")
  say(f"  mesh      {r['collectives_text']} per run{loops}")
  if r.get("traffic"):
    t, moved = r["traffic"], r["traffic"]["moved"]
    bound = (f" = {t['other_s'] * 1e3:.1f} ms at the published {t['bandwidth'] / 1e12:.3g} TB/s"
             if t["other_s"] is not None else "")
    say(f"  traffic   {t['kernels']} kernels a run moving {_gib(sum(moved.values()))} "
        f"(estimated): GEMMs {_gib(moved['gemm'])}, custom kernels {_gib(moved['custom'])}, "
        f"other fusions {_gib(moved['other'])}{bound}")
  say(f"  compile   {r['seconds']:.1f} s")


def check_stage(config, devices, budget: int | None, *, presets: dict[str, str],
                names: Sequence[str] = ()) -> tuple[Any, list[dict[str, Any]]]:
  """(StagePrograms, measure() of each program, or of those in `names`)."""
  stage = stage_programs(config, devices, presets)
  chosen = [p for p in stage.programs if not names or p.name in names]
  if not chosen:
    raise ValueError(f"--programs {list(names)}: none of {[p.name for p in stage.programs]}")
  return stage, [measure(p, stage, budget) for p in chosen]


def _stage_fits(results: list[dict[str, Any]]) -> bool | None:
  verdicts = [r["fits"] for r in results]
  return False if False in verdicts else None if None in verdicts else True


def _with_batch(config, knob: str, value: int):
  variant = config.copy_and_resolve_references()
  section, field = knob.split(".")
  variant[section][field] = value
  return variant


def find_batch(config, devices, budget: int, *, presets, names=(), say=print
               ) -> dict[str, Any]:
  """The largest batch (a multiple of `batch_unit`) whose programs all fit, by compiling:
  doubling from one unit until one does not fit, then bisecting.

  Returns:
    {knob, unit, largest (0: not even one unit fits), compiles, probes: [{batch, fits,
    peak}], stage, results: the largest fitting batch's measure() results}.
  """
  knob = batch_knob(config)
  unit = batch_unit(config, stage_programs(config, devices, presets).batch_shards)
  probes, best, compiles = [], None, 0
  lo, hi, m = 0, None, 1
  while hi is None or hi - lo > 1:
    stage, results = check_stage(_with_batch(config, knob, m * unit), devices, budget,
                                 presets=presets, names=names)
    compiles += len(results)
    fits = _stage_fits(results)
    peak = max(r["peak"] for r in results)
    probes.append(dict(batch=m * unit, fits=fits, peak=peak))
    say(f"find_batch  {knob}={m * unit}: peak {_gib(peak)}"
        f"{_verdict(peak, budget)} ({sum(r['seconds'] for r in results):.0f} s)")
    if fits:
      lo, best = m, (stage, results)
    else:
      hi = m
    m = 2 * m if hi is None else (lo + hi) // 2
  return dict(knob=knob, unit=unit, largest=lo * unit, compiles=compiles, probes=probes,
              stage=best[0] if best else None, results=best[1] if best else [])


def _check_batch_divides(config, devices, presets) -> None:
  """A batch that does not split evenly over the mesh's batch shards is a usage error naming
  the config key and the nearest batches that do, not an IndivisibleError from deep in JAX."""
  knob = batch_knob(config)
  shards = stage_programs(config, devices, presets).batch_shards
  unit = batch_unit(config, shards)
  section, field = knob.split(".")
  value = config[section][field]
  if value % unit:
    below, above = value // unit * unit, (value // unit + 1) * unit
    raise app.UsageError(
        f"config.{knob}={value} does not split over the mesh's {shards} batch shards (with "
        f"grad_accum_steps / RL minibatches: multiples of {unit}); use "
        + (f"{below} or {above}" if below else f"{above}")
        + ", more tensor parallelism (config.mesh.tensor), or --find_batch")


def _parse_presets(values: Sequence[str]) -> dict[str, str]:
  out = {}
  for value in values:
    name, sep, preset = value.partition("=")
    if not sep or not preset:
      raise app.UsageError(f"--frozen {value!r}: expected name=preset (teacher=llama3_8b)")
    out[name] = preset
  return out


def check(config, *, topology: str = "", num_slices: int = 1, hbm_gib: float | None = None,
          print_layout: bool = False, search: bool = False, presets: dict[str, str] | None = None,
          names: Sequence[str] = (), out=sys.stdout) -> dict[str, Any]:
  """Compiles `config`'s programs for `topology` and reports them; see the module doc.

  Returns:
    A summary dict (also printed as the last line, JSON) with `fits` True / False / None.
  """
  say = lambda text, end="\n": print(text, file=out, flush=True, end=end)
  presets = presets or {}
  devices, budget, target_name = None, None, "this machine"
  gpus = parse_gpu_target(topology) if topology else None
  if gpus is not None:
    if num_slices != 1:
      raise app.UsageError("GPU hosts go in --topology (h100:4x8), not --num_slices")
    devices = gpu_target_devices(gpus)
    budget, target_name = gpus.hbm_bytes, str(gpus)
  elif topology:
    target = parse_topology(topology, num_slices)
    devices = topology_devices(target)
    budget, target_name = target.hbm_bytes, str(target)
  if hbm_gib:
    budget = int(hbm_gib * GIB)
  config = config.copy_and_resolve_references()
  if not config.init_from:
    config.init_from = SHAPES_ONLY
  found = None
  if search:
    if budget is None:
      raise app.UsageError("--find_batch needs a budget: --topology or --hbm_gib")
    found = find_batch(config, devices, budget, presets=presets, names=names, say=say)
    stage, results = found["stage"], found["results"]
    if stage is not None:
      config = _with_batch(config, found["knob"], found["largest"])
  if not search or stage is None:
    _check_batch_divides(config, devices, presets)
    stage, results = check_stage(config, devices, budget, presets=presets, names=names)
  mesh = stage.mesh
  say(f"target      {target_name}: {mesh.size} x {mesh.devices.flat[0].device_kind}"
      + (f", {_gib(budget)} per device" if budget else ""))
  knob = batch_knob(config)
  section, field = knob.split(".")
  say(f"stage       {stage.stage}: mesh {dict(mesh.shape)}, rules {config.mesh.rules!r}; "
      f"{knob} {config[section][field]}, grad_accum {config.train.grad_accum_steps}, remat "
      f"{config.model.remat!r}, scan_layers {config.model.scan_layers}, compute "
      f"{config.model.dtype}")
  resident = {n: stage.resident_bytes(n) for n in stage.resident}
  say(f"model       {stage.params / 1e9:.3f} B params; resident per device: "
      + ", ".join(f"{n} {_gib(b)}" for n, b in resident.items()))
  for r in results:
    report_program(r, budget, say)
  fits = _stage_fits(results)
  if found is not None:
    say(f"find_batch  largest {found['knob']} that fits: {found['largest']} (multiples of "
        f"{found['unit']}), {found['compiles']} compiles")
  if budget is not None:
    say("verdict     " + ("fits" if fits else "DOES NOT FIT") + ": every program's peak (its "
        "own memory + the params and optimizer state resident beside it) within the budget")
  if print_layout:
    say(describe_layout(stage.logical_axes, stage.resident["params"]), end="")
  strip = lambda r: {k: v for k, v in r.items() if k != "collectives_text"}
  summary = dict(target=topology or "local", num_slices=num_slices, devices=mesh.size,
                 mesh=dict(mesh.shape), stage=stage.stage, batch_knob=knob,
                 batch=config[section][field], seq_len=config.data.seq_len, params=stage.params,
                 budget=budget, fits=fits, resident_bytes=resident,
                 peak_bytes=max(r["peak"] for r in results),
                 programs=[strip(r) for r in results],
                 find_batch=None if found is None else {k: found[k] for k in (
                     "knob", "unit", "largest", "compiles", "probes")})
  say(json.dumps(summary, default=float))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TOPOLOGY.value:
    # Compile for the topology only: JAX's own backend stays on the CPU even on a TPU VM, so
    # the check never touches (or waits for) chips a training run may hold.
    jax.config.update("jax_platforms", "cpu")
  summary = check(_CONFIG.value, topology=_TOPOLOGY.value, num_slices=_NUM_SLICES.value,
                  hbm_gib=_HBM_GIB.value, print_layout=_PRINT_LAYOUT.value,
                  search=_FIND_BATCH.value, presets=_parse_presets(_FROZEN.value),
                  names=_PROGRAMS.value)
  sys.exit(1 if summary["fits"] is False else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

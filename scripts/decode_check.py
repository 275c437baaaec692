"""Compiles the sampler for an accelerator ahead of time and reports what its decode step moves.

  python -m scripts.decode_check --target h200 --preset 1b --prompts 32
  python -m scripts.decode_check --target h200 --preset 1b --sample_weights int8
  python -m scripts.decode_check --target h200 --preset 1b --decode_layers scan  # the old step
  python -m scripts.decode_check --target h200 --preset 1b --decode_gemm pallas  # Pallas GEMMs
  python -m scripts.decode_check --target v5e:1x1 --preset 1b                     # a TPU chip
  python -m scripts.decode_check --target h200 --preset 8b --tensor 8   # 8 GPUs, heads split

Decoding is bound by memory bandwidth: a step should read every weight and the KV cache
once, in as few kernels as possible. This compiles `scripts.benchmark generate`'s workload
(random prompts, the preset's model, `models.sampler.make_sampler`) for the target without
it: a GPU through JAX's CUDA plugin (parallel/gpu_target.py; under the flags a GPU run gets,
parallel/xla_settings.py GPU_FLAGS), a TPU chip through libtpu (parallel/tpu_topology.py). It
reads the compiled decode loop (parallel/kernel_stats.py `loop_kernel_stats`):

  kernels  launches per decode step, by kind (GEMMs and Pallas kernels by name, fusions by
           the ops they hold)
  traffic  bytes read and written per step, against the step's minimum (weights as the
           sampler holds them plus every cache slot: scripts/benchmarks/generation.py
           `decode_bytes`, the figure `benchmark generate` divides by the step time)
  bound    the step's time if every byte moved at the chip's published bandwidth, and the
           bandwidth utilisation that would give; launches and small kernels cost more
  memory   the program's temporaries (the weights as the sampler holds them, the cache, the
           unrolled layers' slices) beside its arguments

With `--tensor N` the sampler runs tensor-parallel over N devices (the weights' heads and MLP
columns and the cache's key heads split, rules `fsdp_tp`); every figure is one device's, its
minimum the step's over N.

The last line is the JSON summary. JAX itself stays on the CPU.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import pretrain
from models.build import build_model_spec
from models.sampler import (GPU_INT8_COMPILER_OPTIONS, check_length, make_sampler,
                            unrolls_decode)
from parallel.gpu_target import GPU_SPECS, gpu_devices
from parallel.hlo_stats import format_bytes, shape_bytes
from parallel.kernel_stats import loop_kernel_stats, shape_dims
from parallel.mesh import make_mesh
from parallel.peak import published_memory_bandwidth
from parallel.rules import batch_sharding, get_rules, tree_shardings
from parallel.tpu_topology import parse_topology, topology_devices
from parallel.xla_settings import GPU_FLAGS, compiler_options
from scripts.benchmarks.generation import decode_bytes

_TARGET = flags.DEFINE_string("target", "h200", "A GPU (" + ", ".join(sorted(GPU_SPECS))
                              + ") or a TPU topology (v5e:1x1, ...) to compile for.")
_PRESET = flags.DEFINE_string("preset", "1b", "configs/pretrain.py preset of the model.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_PROMPTS = flags.DEFINE_integer("prompts", 32, "Rows decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
_WEIGHTS = flags.DEFINE_enum("sample_weights", "compute", ["compute", "int8"],
                             "The sampler's matrices in the compute dtype or int8.")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Devices the sampler runs tensor-parallel over.")
_GEMM = flags.DEFINE_enum("decode_gemm", "xla", ["xla", "pallas"],
                          "The decode steps' products: XLA's GEMMs or models/decode_gemm.py's "
                          "kernel (GPU).")
_LAYERS = flags.DEFINE_enum("decode_layers", "auto", ["auto", "scan", "unrolled"],
                            "The decode steps' layer loop (auto: the sampler's default, "
                            "unrolled on GPU).")


def gpu_compiler_options(weights: str = "compute") -> dict[str, Any]:
  """GPU_FLAGS as compile options, with the sampler's own GPU options for `weights` on top,
  as a GPU run compiles it."""
  options = compiler_options(GPU_FLAGS)
  if weights == "int8":
    options.update(GPU_INT8_COMPILER_OPTIONS)
  return options


def _attention_reads(operands: list[str]) -> int:
  """Bytes models/decode_attention.py's kernel reads: its small operands whole and, of the
  stacked cache it is handed (`[layers, ...]` keys and values), its own layer's."""
  total = 0
  for shape in operands:
    dims = shape_dims(shape)
    total += shape_bytes(shape) // (dims[0] if len(dims) == 5 else 1)
  return total


def target_devices(target: str, count: int = 1) -> tuple[list, float, bool]:
  """(`count` compile-only devices, published bandwidth in bytes/s of one, whether GPUs) of
  `target`."""
  if target in GPU_SPECS:
    return gpu_devices(target, count), GPU_SPECS[target][2], True
  devices = topology_devices(parse_topology(target))
  if len(devices) < count:
    raise ValueError(f"{target} has {len(devices)} chips, fewer than {count}")
  devices = devices[:count]
  bandwidth = published_memory_bandwidth(devices[0].device_kind)
  if bandwidth is None:
    raise ValueError(f"no published bandwidth for {devices[0].device_kind!r}")
  return devices, bandwidth, False


def check(target: str = "h200", preset: str = "1b", *, dtype: str = "bfloat16",
          prompts: int = 32, prompt_len: int = 64, new_tokens: int = 128,
          weights: str = "compute", unroll: bool | None = None, tensor: int = 1,
          gemm: str = "xla", model_overrides: dict | None = None) -> dict[str, Any]:
  """Compiles the sampler for `target` (a GPU_SPECS name or a TPU topology; `tensor` devices,
  tensor-parallel) and returns one device's decode-step figures (module doc)."""
  config = pretrain.get_config(preset)
  config.model.update(dict(dtype=dtype, scan_layers=True, **(model_overrides or {})))
  config.mesh.update(dict(data=1, fsdp=1, tensor=tensor, rules="fsdp_tp"))
  devices, bandwidth, gpu = target_devices(target, tensor)
  mesh, rules = make_mesh(config.mesh, devices), get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  check_length(spec, prompt_len, new_tokens)
  shardings = tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        spec.shapes, shardings)
  tokens = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32,
                                sharding=batch_sharding(mesh, rules))
  lengths = jax.ShapeDtypeStruct((prompts,), jnp.int32,
                                 sharding=batch_sharding(mesh, rules, ndim=1))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  sampler = make_sampler(spec, max_new_tokens=new_tokens, eos_id=-1, temperature=1.0,
                         mesh=mesh, rules=rules, weights=weights, unroll=unroll, gemm=gemm)
  start = time.perf_counter()
  compiled = sampler.lower(params, tokens, lengths, key).compile(
      gpu_compiler_options(weights) if gpu else None)
  compile_s = time.perf_counter() - start
  stats = loop_kernel_stats(compiled.as_text(), readers={"decode_attention": _attention_reads})
  memory = compiled.memory_analysis()
  minimum = decode_bytes(spec, prompts, prompt_len + new_tokens - 1,
                         weights)["step_bytes"] / tensor
  moved = stats.read + stats.written
  return dict(target=target, device_kind=devices[0].device_kind, preset=preset, dtype=dtype,
              prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens, weights=weights,
              tensor=tensor, gemm=gemm, decode_layers="unrolled" if unrolls_decode(mesh, unroll) else "scan",
              compile_s=compile_s, kernels=stats.kernels, read_bytes=stats.read,
              written_bytes=stats.written, moved_bytes=moved, minimum_bytes=minimum,
              traffic_ratio=moved / minimum, bound_step_s=moved / bandwidth,
              bound_utilisation=min(1.0, minimum / moved), bandwidth=bandwidth,
              temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
              by_kind={k: list(v) for k, v in stats.by_kind.items()}, summary=stats.summary())


def format_check(r: dict[str, Any]) -> str:
  return "\n".join([
      f"target    {r['device_kind']} (compile only), {r['preset']} in {r['dtype']}"
      + (" with int8 weights" if r["weights"] == "int8" else "")
      + f"; {r['prompts']} rows x ({r['prompt_len']} + {r['new_tokens']}) tokens, decode "
      f"layers {r['decode_layers']}" + (", products by the Pallas kernel"
                                        if r.get("gemm") == "pallas" else "")
      + (f", tensor-parallel over {r['tensor']} (figures per device)" if r["tensor"] > 1
         else "") + f"; compiled in {r['compile_s']:.1f} s",
      f"kernels   {r['kernels']} per decode step",
      f"traffic   {format_bytes(r['read_bytes'])} read + {format_bytes(r['written_bytes'])} "
      f"written per step; minimum {format_bytes(r['minimum_bytes'])} (weights + KV cache): "
      f"{r['traffic_ratio']:.2f}x",
      f"bound     {r['bound_step_s'] * 1e3:.3f} ms per step at {r['bandwidth'] / 1e12:.3g} "
      f"TB/s: at most {100 * r['bound_utilisation']:.0f}% bandwidth utilisation",
      f"by kind   {r['summary'].split('; ', 1)[1]}",
      f"memory    {format_bytes(r['temp_bytes'])} of temporaries beside "
      f"{format_bytes(r['argument_bytes'])} of arguments (the params, stored)",
  ])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # JAX stays on the CPU; the CUDA plugin only compiles (parallel/gpu_target.py).
  jax.config.update("jax_platforms", "cpu")
  result = check(_TARGET.value, _PRESET.value, dtype=_DTYPE.value, prompts=_PROMPTS.value,
                 prompt_len=_PROMPT_LEN.value, new_tokens=_NEW_TOKENS.value,
                 weights=_WEIGHTS.value, tensor=_TENSOR.value, gemm=_GEMM.value,
                 unroll={"auto": None, "scan": False, "unrolled": True}[_LAYERS.value])
  print(format_check(result))
  print(json.dumps({k: v for k, v in result.items() if k != "summary"}))


if __name__ == "__main__":
  app.run(main)

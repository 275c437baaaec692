"""`benchmark_generate`: new tokens/s of the KV-cached sampler (models/sampler.py).

Run through `python -m scripts.benchmark generate` (16 prompts of 64 tokens, 128 new tokens
sampled, on the `bench` model). `benchmark_generate(config)` times `make_sampler`'s jitted
prefill + decode loop exactly as generation runs it (same mesh and logical-axis rules as
training, params initialised sharded) on `batch` random prompts of `prompt_len` tokens.
`eos_id` is -1, a token the model never emits, so every row generates all `max_new_tokens`:
every call does the same work and the count of new tokens is exact.

Reported: new tokens/s over the whole call (prefill included), the prefill alone (a sampler
with one new token), decode tokens/s without it, model FLOP/s of the forward passes
(`generation_flops`) and the compile times.

Decoding is bound by memory bandwidth, not matmul rate: every step reads all the weights and
the whole KV cache to produce one token per row. So the benchmark also reports the decode
step's memory-bandwidth utilisation: `decode_step_bytes` (`decode_bytes`: weights as the
sampler holds them, in the compute dtype or, with `weights="int8"`, int8 and scales, plus
every cache slot of every layer, which each step's attention reads) / the decode step's time
/ the machine's bandwidth. The bandwidth is the chip's published peak on accelerators
(parallel/peak.py), with a streaming rate measured in the same run beside it; on CPU, that
measured rate.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

import models  # noqa: F401  (sets flax's variable-sharding mode before any module is built)
from models.build import build_model_spec, count_params
from models.flops import forward_flops_per_token
from models.layers import dtype_of
from models.sampler import check_length, make_sampler, sampling_params, unrolls_decode
from parallel.peak import measure_memory_bandwidth, published_memory_bandwidth
from parallel.mesh import make_mesh
from parallel.rules import batch_sharding, get_rules, tree_shardings


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time_calls(fn, args, repeats: int, warmup: int):
  """Wall-clock and process CPU seconds of `repeats` calls, after `warmup` untimed ones.

  The CPU time (all threads) is the steadier figure on a machine shared with other jobs.

  Returns:
    (wall seconds, CPU seconds, the last call's output).
  """
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    out = jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - start)
    cpu.append(_cpu_seconds() - start_cpu)
  return wall, cpu, out


def generation_flops(cfg: ml_collections.ConfigDict, batch: int, prompt_len: int,
                     new_tokens: int) -> int:
  """Forward model FLOPs of one sampler call (models/flops.py conventions).

  The prompt goes through the trunk (logits at its last position only, which give the first
  new token); each of the other `new_tokens - 1` tokens goes through trunk and LM head and
  attends to the prompt and the tokens before it, `prompt_len + new_tokens / 2` keys on
  average. `forward_flops_per_token(cfg, s)` counts a causal sequence of `s` (`s / 2` keys on
  average), hence the doubled lengths below.
  """
  head = 2 * cfg.d_model * cfg.vocab_size
  prefill = prompt_len * (forward_flops_per_token(cfg, prompt_len) - head) + head
  decode = (new_tokens - 1) * forward_flops_per_token(cfg, 2 * prompt_len + new_tokens)
  return batch * (prefill + decode)


def decode_bytes(spec, batch: int, cache_len: int, weights: str = "compute"
                 ) -> dict[str, int]:
  """Bytes one decode step reads from memory: weights and KV cache.

  Weights as `make_sampler` holds them (`models.sampler.sampling_params`): matrices in the
  compute dtype when stored wider, or int8 values and their float32 scales
  (`weights="int8"`), vectors and the router as stored. The input
  embedding table (and GPT-2's position table) is not counted unless it is also the LM head
  (tied): a step reads only its rows for `batch` tokens. MoE experts all count (with a batch of
  rows, top-k routing touches nearly all of them). The cache: keys and values of every layer,
  all `cache_len` slots (attention reads every slot, masked), plus the slot segment ids.
  """
  cfg = spec.config
  compute = dtype_of(cfg.dtype)
  held = jax.eval_shape(lambda p: sampling_params(spec, p, weights), spec.shapes)
  weight_bytes = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(held):
    # The param's name: the last dict key (an Int8Weight adds its values and scale below it).
    name = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    if name == "pos_embed" or (name == "embed" and not cfg.tie_embeddings):
      continue
    weight_bytes += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
  head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
  cache = (2 * cfg.num_layers * batch * cfg.num_kv_heads * cache_len * head_dim
           * compute.itemsize + batch * cache_len * 4)
  return dict(weight_bytes=weight_bytes, cache_bytes=cache, step_bytes=weight_bytes + cache)


def bandwidth_figures(nbytes: int, repeats: int = 10) -> dict[str, Any]:
  """The bandwidth denominator: the chip's published peak where known (accelerators), else the
  streaming rate measured here; the measured rate is reported in both cases."""
  device = jax.devices()[0]
  measured = measure_memory_bandwidth(nbytes, repeats)
  published = (published_memory_bandwidth(device.device_kind)
               if device.platform != "cpu" else None)
  if published is not None:
    return dict(memory_bandwidth=published, measured_bandwidth=measured,
                bandwidth_source=f"published peak of {device.device_kind}")
  return dict(memory_bandwidth=measured, measured_bandwidth=measured,
              bandwidth_source=f"measured streaming {nbytes / 2**20:.0f} MiB")


def benchmark_generate(config: ml_collections.ConfigDict, *, batch: int = 16,
                       prompt_len: int = 64, max_new_tokens: int = 128,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       repeats: int = 3, warmup: int = 1, seed: int = 0,
                       weights: str = "compute", unroll: bool | None = None,
                       gemm: str = "xla", profile_dir: str = "") -> dict[str, Any]:
  """Times generation with the model, mesh and rules of `config` (a configs/pretrain.py config).

  Args:
    config: its `model`, `mesh` and `seed` are read; the params are random.
    batch: prompts per call; the prompts are random ids `[batch, prompt_len]`.
    prompt_len: tokens per prompt.
    max_new_tokens: tokens generated per prompt; no row stops early.
    temperature, top_k, top_p: the sampling settings (temperature 0: greedy).
    repeats: timed calls.
    warmup: untimed calls before them (after compiling).
    seed: of the prompts and of the sampling key.
    weights: the sampler's weights, "compute" or "int8" (models/quantize.py).
    unroll: the decode steps' layers unrolled (True), scanned (False) or as the sampler
      picks for the platform (None; models/sampler.py `make_sampler`).
    gemm: the decode steps' products, "xla" or "pallas" (models/decode_gemm.py, GPU).
    profile_dir: after the timed calls, trace one more under `jax.profiler.trace` into this
      folder (a Perfetto trace; scripts/trace_summary.py reads it); '' = none.

  Returns:
    A flat dict: `new_tokens` (counted in the last call's output: `batch * max_new_tokens`),
    `new_tokens_per_sec` (over the median call time), `call_s_*` wall-clock statistics,
    `call_cpu_s_median` (process CPU time, all threads), `prefill_s`,
    `decode_tokens_per_sec` (the new tokens after the first, over the call time minus the
    prefill), `flops_per_call` and `model_flops_per_sec` (`generation_flops`), `compile_s`
    and `prefill_compile_s`.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  mesh, rules = make_mesh(config.mesh), get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  check_length(spec, prompt_len, max_new_tokens)
  shardings = tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  params = jax.jit(spec.init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  rng = np.random.default_rng(seed)
  # Ids from 4 up: the ids below are the tokenizers' special symbols (pad, unk, BOS, EOS).
  tokens = rng.integers(4, config.model.vocab_size, (batch, prompt_len)).astype(np.int32)
  tokens = jax.device_put(tokens, batch_sharding(mesh, rules))
  lengths = jax.device_put(np.full((batch,), prompt_len, np.int32),
                           batch_sharding(mesh, rules, ndim=1))
  settings = dict(eos_id=-1, temperature=temperature, top_k=top_k, top_p=top_p, mesh=mesh,
                  rules=rules, weights=weights, unroll=unroll, gemm=gemm)
  args = (params, tokens, lengths, jax.random.PRNGKey(seed))

  def compile_sampler(new_tokens):
    start = time.perf_counter()
    compiled = make_sampler(spec, max_new_tokens=new_tokens, **settings).lower(*args).compile()
    return compiled, time.perf_counter() - start

  sampler, compile_s = compile_sampler(max_new_tokens)
  prefill, prefill_compile_s = compile_sampler(1)
  times, cpu_times, out = _time_calls(sampler, args, repeats, warmup)
  new_tokens = int(np.asarray(out["lengths"]).sum())
  if new_tokens != batch * max_new_tokens:
    raise RuntimeError(f"{new_tokens} new tokens, not {batch} x {max_new_tokens}: a row "
                       "stopped early, and the benchmark needs every row to run to the end")
  prefill_s = statistics.median(_time_calls(prefill, args, repeats, warmup)[0])
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      jax.block_until_ready(sampler(*args))
  call_s = statistics.median(times)
  flops = generation_flops(config.model, batch, prompt_len, max_new_tokens)
  # The cache the sampler allocates: the prompt plus every new token but the last.
  traffic = decode_bytes(spec, batch, prompt_len + max_new_tokens - 1, weights)
  decode_step_s = max(call_s - prefill_s, 1e-9) / max(max_new_tokens - 1, 1)
  on_cpu = jax.devices()[0].platform == "cpu"
  bandwidth = bandwidth_figures(1 << (28 if on_cpu else 31))
  return dict(
      subcommand="generate", devices=mesh.size, platform=jax.devices()[0].platform,
      params=count_params(spec.shapes), batch=batch, prompt_len=prompt_len,
      max_new_tokens=max_new_tokens, new_tokens=new_tokens, temperature=temperature,
      top_k=top_k, top_p=top_p, dtype=config.model.dtype, attention=config.model.attention,
      weights=weights, gemm=gemm, profile_dir=profile_dir,
      decode_layers=("unrolled" if unrolls_decode(mesh, unroll) else "scan"),
      repeats=repeats, warmup=warmup, call_s_median=call_s,
      call_s_mean=statistics.fmean(times), call_s_min=min(times),
      call_cpu_s_median=statistics.median(cpu_times),
      new_tokens_per_sec=new_tokens / call_s, prefill_s=prefill_s,
      decode_tokens_per_sec=batch * (max_new_tokens - 1) / max(call_s - prefill_s, 1e-9),
      flops_per_call=flops, model_flops_per_sec=flops / call_s, compile_s=compile_s,
      prefill_compile_s=prefill_compile_s, decode_step_s=decode_step_s,
      decode_weight_bytes=traffic["weight_bytes"], decode_cache_bytes=traffic["cache_bytes"],
      decode_step_bytes=traffic["step_bytes"],
      decode_bandwidth=traffic["step_bytes"] / decode_step_s, **bandwidth,
      bandwidth_utilisation=traffic["step_bytes"] / decode_step_s
      / bandwidth["memory_bandwidth"])


def format_generate(result: dict[str, Any]) -> str:
  """Human-readable lines of a `benchmark_generate` result."""
  return "\n".join([
      f"generate: {result['params'] / 1e6:.1f}M params, {result['batch']} prompts x "
      f"{result['prompt_len']} tokens, {result['max_new_tokens']} new tokens, temperature "
      f"{result['temperature']}, {result['dtype']}"
      + (" with int8 weights" if result["weights"] == "int8" else "")
      + f", decode layers {result['decode_layers']}"
      + (", Pallas decode GEMMs" if result.get("gemm") == "pallas" else "")
      + f", {result['devices']} "
      f"{result['platform']} device(s)",
      f"call time        {result['call_s_median']:.3f} s median (mean "
      f"{result['call_s_mean']:.3f}, min {result['call_s_min']:.3f}, {result['repeats']} runs; "
      f"{result['call_cpu_s_median']:.3f} s of process CPU time)",
      f"new tokens/s     {result['new_tokens_per_sec']:,.0f} ({result['new_tokens']} new "
      "tokens per call)",
      f"prefill          {result['prefill_s'] * 1e3:.1f} ms; decode "
      f"{result['decode_tokens_per_sec']:,.0f} tokens/s",
      f"model FLOP/s     {result['model_flops_per_sec'] / 1e9:.1f} G (forward passes)",
      f"decode step      {result['decode_step_s'] * 1e3:.2f} ms reading "
      f"{result['decode_step_bytes'] / 2**20:.1f} MiB (weights "
      f"{result['decode_weight_bytes'] / 2**20:.1f}, KV cache "
      f"{result['decode_cache_bytes'] / 2**20:.1f}): "
      f"{result['decode_bandwidth'] / 1e9:.1f} GB/s",
      f"bandwidth util.  {100 * result['bandwidth_utilisation']:.1f}% of "
      f"{result['memory_bandwidth'] / 1e9:.1f} GB/s ({result['bandwidth_source']}"
      + ("" if result["bandwidth_source"].startswith("measured") else
         f"; measured {result['measured_bandwidth'] / 1e9:.1f} GB/s") + ")",
      f"compile          {result['compile_s']:.1f} s (prefill-only sampler "
      f"{result['prefill_compile_s']:.1f} s)",
  ])

"""`benchmark_clm`: tokens/s, model FLOP/s and memory of the causal-LM train step.

Run through `python -m scripts.benchmark clm` (scripts/benchmark.py has the flags, the MFU
conventions and the platform settings). The step is the one training runs: the pretraining
stage built by training/setup.py's `build_setup` (mesh, rules, sharded state, jitted and
donated step, optimizer) on random full-length rows (`random_clm_batch`); the matmul peak
MFU is measured against is measured in the same run (`peak_figures`).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.build import count_params
from models.flops import train_flops_per_token
from parallel.peak import measure_matmul_flops, published_peak_flops
from training.registry import get_stage
from training.setup import build_setup


def random_clm_batch(rng, batch: int, seq_len: int, vocab: int) -> dict[str, Any]:
  """Uniform random tokens, every row one full segment (no padding): the worst case for
  nothing and the typical case of packed pretraining rows."""
  tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              loss_mask=np.ones((batch, seq_len), np.float32),
              segment_ids=np.ones((batch, seq_len), np.int32),
              positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)))


def memory_figures(compiled) -> dict[str, int]:
  """Bytes from `compiled.memory_analysis()`; `peak_memory_bytes` = temp + arguments + outputs.
  Donated outputs reuse their arguments' buffers (`alias_bytes`), so the live peak is lower by
  that much; both are reported."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  get = lambda name: int(getattr(analysis, name, 0) or 0)
  figures = dict(temp_bytes=get("temp_size_in_bytes"),
                 argument_bytes=get("argument_size_in_bytes"),
                 output_bytes=get("output_size_in_bytes"),
                 alias_bytes=get("alias_size_in_bytes"))
  figures["peak_memory_bytes"] = (figures["temp_bytes"] + figures["argument_bytes"]
                                  + figures["output_bytes"])
  return figures


def measure_peak(sizes, repeats: int, dtype: str = "float32") -> tuple[float, int]:
  """Best `dtype` matmul FLOP/s over `sizes` (parallel/peak.py), and the size that gave it."""
  best, best_n = 0.0, 0
  for n in sizes:
    rate = measure_matmul_flops(n=int(n), dtype=jnp.dtype(dtype), repeats=repeats)
    if rate > best:
      best, best_n = rate, int(n)
  return best, best_n


def peak_figures(sizes, repeats: int, dtype: str) -> dict[str, Any]:
  """The MFU denominator and where it comes from.

  On a chip with a published dense peak (TPU, H100 / H200, ...: parallel/peak.py's table, the
  chip read from `jax.devices()`), that peak for the compute `dtype`, with the matmul rate
  measured in the same dtype beside it. On CPUs, which publish none, the float32 matmul rate
  measured on this machine in the same run.
  """
  device = jax.devices()[0]
  published = (published_peak_flops(device.device_kind, dtype)
               if device.platform != "cpu" else None)
  measure_dtype = dtype if published is not None else "float32"
  measured, n = measure_peak(sizes, repeats, measure_dtype)
  if published is not None:
    return dict(peak_flops_per_sec=published, peak_matmul_size=n, measured_matmul=measured,
                peak_source=f"published {dtype} dense peak of {device.device_kind}")
  return dict(peak_flops_per_sec=measured, peak_matmul_size=n, measured_matmul=measured,
              peak_source=f"measured float32 {n}^3 matmul")


def format_peak(result: dict[str, Any]) -> str:
  """The peak line: the MFU denominator, and the measured matmul rate when that is not it."""
  line = f"peak             {result['peak_flops_per_sec'] / 1e9:,.1f} G ({result['peak_source']})"
  if result["peak_source"].startswith("published"):
    line += (f"; measured {result['measured_matmul'] / 1e9:,.1f} G "
             f"({result['peak_matmul_size']}^3 matmul)")
  return line


def benchmark_clm(config, *, steps: int, warmup: int, peak_sizes=(1024, 2048),
                  peak_repeats: int = 8, seed: int = 0) -> dict[str, Any]:
  """Times the causal-LM train step of `config` (a configs/pretrain.py config).

  The state, mesh, shardings and step are made by the same functions training uses; batches are
  random tokens of shape `[global_batch_size, seq_len]`, one segment per row.

  Returns:
    A flat dict: `tokens_per_sec` (from the median step time), `flops_per_token`,
    `model_flops_per_sec`, `peak_flops_per_sec` (measured float32 matmul rate), `mfu`,
    `compile_s`, step-time statistics and `memory_figures` of the compiled step.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  batch_size, seq_len = config.data.global_batch_size, config.data.seq_len
  setup = build_setup(config, get_stage(config.objective.name),
                      total_updates=max(config.train.steps, warmup + steps))
  mesh, spec = setup.mesh, setup.spec
  state = setup.fresh_state()
  step = setup.train_step()

  rng = np.random.default_rng(seed)
  sharding = setup.data_sharding
  batches = [jax.device_put(random_clm_batch(rng, batch_size, seq_len, config.model.vocab_size),
                            sharding) for _ in range(2)]

  start = time.perf_counter()
  compiled = step.lower(state, batches[0], {}).compile()
  compile_s = time.perf_counter() - start
  memory = memory_figures(compiled)

  metrics = None
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 2], {})
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2], {})
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  loss_sum, loss_weight = metrics["loss"]
  loss = float(loss_sum) / max(float(loss_weight), 1.0)

  peak = peak_figures(peak_sizes, peak_repeats, config.model.dtype)
  step_s = statistics.median(times)
  tokens_per_sec = batch_size * seq_len / step_s
  flops_per_token = train_flops_per_token(config.model, seq_len)
  model_flops = tokens_per_sec * flops_per_token
  return dict(
      subcommand="clm", devices=mesh.size, platform=jax.devices()[0].platform,
      batch=batch_size, seq_len=seq_len, dtype=config.model.dtype, remat=config.model.remat,
      attention=config.model.attention, params=count_params(spec.shapes),
      steps=steps, warmup=warmup, step_s_median=step_s, step_s_mean=statistics.fmean(times),
      step_s_min=min(times), final_loss=loss, tokens_per_sec=tokens_per_sec,
      flops_per_token=flops_per_token, model_flops_per_sec=model_flops,
      **peak, mfu=model_flops / peak["peak_flops_per_sec"], compile_s=compile_s, **memory,
      xla_flags=os.environ.get("XLA_FLAGS", ""))


def format_clm(result: dict[str, Any]) -> str:
  """Human-readable lines of a `benchmark_clm` result."""
  mib = lambda key: result.get(key, 0) / 2**20
  lines = [
      f"clm: {result['params'] / 1e6:.1f}M params, batch {result['batch']} x seq "
      f"{result['seq_len']}, {result['dtype']}, remat {result['remat']}, attention "
      f"{result['attention']}, {result['devices']} {result['platform']} device(s)",
      f"step time        {result['step_s_median'] * 1e3:.1f} ms median "
      f"(mean {result['step_s_mean'] * 1e3:.1f}, min {result['step_s_min'] * 1e3:.1f}, "
      f"{result['steps']} steps)",
      f"tokens/s         {result['tokens_per_sec']:,.0f}",
      f"model FLOP/s     {result['model_flops_per_sec'] / 1e9:.1f} G "
      f"({result['flops_per_token'] / 1e6:.1f} MFLOP/token)",
      format_peak(result),
      f"MFU              {100 * result['mfu']:.1f}%",
  ]
  if "peak_memory_bytes" in result:
    lines.append(f"memory           {mib('peak_memory_bytes'):.0f} MiB = temp "
                 f"{mib('temp_bytes'):.0f} + args {mib('argument_bytes'):.0f} + outputs "
                 f"{mib('output_bytes'):.0f} ({mib('alias_bytes'):.0f} MiB of outputs alias "
                 "donated args)")
  lines.append(f"compile          {result['compile_s']:.1f} s")
  lines.append(f"final loss       {result['final_loss']:.3f}")
  return "\n".join(lines)

"""Generation throughput: the KV-cached sampler (models/sampler.py) on random prompts.

  python -m scripts.bench_generate              # bench model, 16 prompts x 64, 128 new tokens

`benchmark_generate(config)` times `make_sampler`'s jitted prefill + decode loop exactly as
`generate` runs it (same mesh and logical-axis rules as training, params initialised sharded)
on `batch` random prompts of `prompt_len` tokens. `eos_id` is -1, a token the model never
emits, so every row generates all `max_new_tokens` and every run does the same work.
Reported: new tokens/s over the whole call (prefill included), the prefill alone (a sampler
with one new token), decode tokens/s without it, model FLOP/s of the forward passes, and the
compile times.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

from absl import app, flags


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time_calls(fn, args, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
  """Wall-clock and process CPU seconds of `repeats` calls. The CPU time (all threads) is
  the steadier figure on a machine shared with other jobs."""
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - start)
    cpu.append(_cpu_seconds() - start_cpu)
  return wall, cpu


def benchmark_generate(config, *, batch: int = 16, prompt_len: int = 64,
                       max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, repeats: int = 3, warmup: int = 1,
                       seed: int = 0) -> dict[str, Any]:
  """Times generation with the model, mesh and rules of `config` (a configs/pretrain.py config).

  Returns:
    A flat dict: `new_tokens_per_sec` (batch * max_new_tokens / median call time),
    `call_s_*` wall-clock statistics, `call_cpu_s_median` (process CPU time, all threads),
    `prefill_s`, `decode_tokens_per_sec` (the new tokens after the
    first, over the call time minus the prefill), `model_flops_per_sec` (forward FLOPs of the
    prompt and of every decoded token, models/flops.py), `compile_s` and `prefill_compile_s`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import models  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from models.build import build_model_spec, count_params  # pylint: disable=g-import-not-at-top
  from models.flops import forward_flops_per_token  # pylint: disable=g-import-not-at-top
  from models.sampler import check_length, make_sampler  # pylint: disable=g-import-not-at-top
  from parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from parallel.rules import (batch_sharding, get_rules,  # pylint: disable=g-import-not-at-top
                              tree_shardings)

  mesh, rules = make_mesh(config.mesh), get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  check_length(spec, prompt_len, max_new_tokens)
  shardings = tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  params = jax.jit(spec.init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, config.model.vocab_size, (batch, prompt_len)).astype(np.int32)
  tokens = jax.device_put(tokens, batch_sharding(mesh, rules))
  lengths = jax.device_put(np.full((batch,), prompt_len, np.int32),
                           batch_sharding(mesh, rules, ndim=1))
  key = jax.random.PRNGKey(seed)
  settings = dict(eos_id=-1, temperature=temperature, top_k=top_k, top_p=top_p, mesh=mesh,
                  rules=rules)
  args = (params, tokens, lengths, key)

  def compile_sampler(new_tokens):
    start = time.perf_counter()
    compiled = make_sampler(spec, max_new_tokens=new_tokens, **settings).lower(*args).compile()
    return compiled, time.perf_counter() - start

  sampler, compile_s = compile_sampler(max_new_tokens)
  prefill, prefill_compile_s = compile_sampler(1)
  out = sampler(*args)
  if int(np.asarray(out["lengths"]).min()) != max_new_tokens:
    raise RuntimeError("a row stopped early; the benchmark needs every row to run to the end")
  times, cpu_times = _time_calls(sampler, args, repeats, warmup)
  prefill_s = statistics.median(_time_calls(prefill, args, repeats, warmup)[0])
  call_s = statistics.median(times)
  new_tokens = batch * max_new_tokens
  # Forward FLOPs: the prompt (attention over up to prompt_len keys) and each fed-back token
  # (over the prompt plus half the new tokens on average).
  flops = (batch * prompt_len * forward_flops_per_token(config.model, prompt_len)
           + batch * (max_new_tokens - 1) * forward_flops_per_token(
               config.model, prompt_len + max_new_tokens // 2))
  return dict(
      subcommand="generate", devices=mesh.size, platform=jax.devices()[0].platform,
      params=count_params(spec.shapes), batch=batch, prompt_len=prompt_len,
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      dtype=config.model.dtype, repeats=repeats, call_s_median=call_s,
      call_s_mean=statistics.fmean(times), call_s_min=min(times),
      call_cpu_s_median=statistics.median(cpu_times),
      new_tokens_per_sec=new_tokens / call_s, prefill_s=prefill_s,
      decode_tokens_per_sec=batch * (max_new_tokens - 1) / max(call_s - prefill_s, 1e-9),
      model_flops_per_sec=flops / call_s, compile_s=compile_s,
      prefill_compile_s=prefill_compile_s)


def format_generate(result: dict[str, Any]) -> str:
  """Human-readable lines of a `benchmark_generate` result."""
  return "\n".join([
      f"generate: {result['params'] / 1e6:.1f}M params, {result['batch']} prompts x "
      f"{result['prompt_len']} tokens, {result['max_new_tokens']} new tokens, temperature "
      f"{result['temperature']}, {result['dtype']}, {result['devices']} "
      f"{result['platform']} device(s)",
      f"call time        {result['call_s_median']:.3f} s median (mean "
      f"{result['call_s_mean']:.3f}, min {result['call_s_min']:.3f}, {result['repeats']} runs; "
      f"{result['call_cpu_s_median']:.3f} s of process CPU time)",
      f"new tokens/s     {result['new_tokens_per_sec']:,.0f}",
      f"prefill          {result['prefill_s'] * 1e3:.1f} ms; decode "
      f"{result['decode_tokens_per_sec']:,.0f} tokens/s",
      f"model FLOP/s     {result['model_flops_per_sec'] / 1e9:.1f} G (forward passes)",
      f"compile          {result['compile_s']:.1f} s (prefill-only sampler "
      f"{result['prefill_compile_s']:.1f} s)",
  ])


def define_flags() -> None:
  """This script's own flags; defined only when it runs, so that scripts/benchmark.py can
  import `benchmark_generate` next to its own flags of the same names."""
  flags.DEFINE_string("preset", "bench", "configs/pretrain.py preset to benchmark.")
  flags.DEFINE_integer("batch", 16, "Prompts per call.")
  flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
  flags.DEFINE_integer("max_new_tokens", 128, "New tokens per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy.")
  flags.DEFINE_integer("repeats", 3, "Timed calls (after one warm-up call).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import json  # pylint: disable=g-import-not-at-top

  from configs import pretrain  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  result = benchmark_generate(pretrain.get_config(f.preset), batch=f.batch,
                              prompt_len=f.prompt_len, max_new_tokens=f.max_new_tokens,
                              temperature=f.temperature, repeats=f.repeats)
  print(format_generate(result))
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  app.run(main)

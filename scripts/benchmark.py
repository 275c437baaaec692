"""Throughput benchmarks: the real jitted steps on synthetic data, with MFU and compiled memory.

  python -m scripts.benchmark clm                     # the `bench` shape, 10 timed steps
  python -m scripts.benchmark clm --steps 20 --remat full --attention dense --dtype bfloat16
  python -m scripts.benchmark --help

Subcommands (SUBCOMMANDS): `clm` times the causal-LM train step of configs/pretrain.py:bench
(d_model 512, 8 layers, 8 heads, SwiGLU 1536, vocab 8192, sequence 512, batch 8) exactly as
training runs it: same mesh, sharded state, jitted and donated step, AdamW. It prints tokens/s,
model FLOP/s (models/flops.py: 6N + causal attention), the float32 matmul FLOP/s measured on this
machine in the same run, MFU (their ratio), the compiled step's memory and its compile time, then
one JSON line with every figure.

On CPU the model's own matmuls run through XLA:CPU's dot emitter; see `_CPU_XLA_FLAGS` for the
flags the benchmark sets (only here, never for tests or training) and why.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps run after compiling.")
_PRESET = flags.DEFINE_string("preset", "bench", "configs/pretrain.py preset to benchmark.")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "full", "save_dots"],
                           "Override config.model.remat.")
_ATTENTION = flags.DEFINE_enum("attention", None, ["auto", "dense", "blockwise"],
                               "Override config.model.attention.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Override config.model.dtype (compute dtype; params stay float32).")
_BATCH = flags.DEFINE_integer("batch", None, "Override config.data.global_batch_size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Override config.data.seq_len.")
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["1024", "2048"],
                                "Square matmul sizes to measure the float32 peak at (best wins).")
_PEAK_REPEATS = flags.DEFINE_integer("peak_repeats", 8, "Timed repeats per peak matmul size.")
_XLA_FLAGS = flags.DEFINE_bool("xla_flags", True, "Set the benchmark's XLA:CPU flags "
                               "(_CPU_XLA_FLAGS) before JAX starts.")

# XLA:CPU flags the benchmark sets when XLA_FLAGS does not already hold them. Empty: none of
# the flags tried (see the README's benchmark notes) made the step faster on XLA:CPU.
_CPU_XLA_FLAGS: tuple[str, ...] = ()


def _apply_xla_flags() -> str:
  """Adds `_CPU_XLA_FLAGS` to XLA_FLAGS (before the backend starts); returns the result."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in _CPU_XLA_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return os.environ.get("XLA_FLAGS", "")


def random_clm_batch(rng, batch: int, seq_len: int, vocab: int) -> dict[str, Any]:
  """Uniform random tokens, every row one full segment (no padding): the worst case for
  nothing and the typical case of packed pretraining rows."""
  import numpy as np  # pylint: disable=g-import-not-at-top
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


def measure_peak(sizes, repeats: int) -> tuple[float, int]:
  """Best float32 matmul FLOP/s over `sizes` (training/peak.py), and the size that gave it."""
  from training.peak import measure_matmul_flops  # pylint: disable=g-import-not-at-top
  best, best_n = 0.0, 0
  for n in sizes:
    rate = measure_matmul_flops(n=int(n), repeats=repeats)
    if rate > best:
      best, best_n = rate, int(n)
  return best, best_n


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
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import models  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from models.build import build_model_spec, count_params  # pylint: disable=g-import-not-at-top
  from models.flops import train_flops_per_token  # pylint: disable=g-import-not-at-top
  from parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from parallel.rules import batch_sharding, get_rules  # pylint: disable=g-import-not-at-top
  from training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from training.stages import get_loss_fn  # pylint: disable=g-import-not-at-top
  from training.state import create_train_state  # pylint: disable=g-import-not-at-top
  from training.step import make_train_step  # pylint: disable=g-import-not-at-top

  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  batch_size, seq_len = config.data.global_batch_size, config.data.seq_len
  mesh = make_mesh(config.mesh)
  rules = get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  optimizer, schedule = make_optimizer(config.optimizer, max(config.train.steps, warmup + steps))
  state, shardings = create_train_state(spec, optimizer, mesh, rules, config.seed)
  step = make_train_step(spec, get_loss_fn(config.objective.name), optimizer, schedule,
                         config.objective, mesh=mesh, rules=rules, shardings=shardings,
                         grad_accum_steps=config.train.grad_accum_steps)

  rng = np.random.default_rng(seed)
  sharding = batch_sharding(mesh, rules)
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

  peak, peak_n = measure_peak(peak_sizes, peak_repeats)
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
      peak_flops_per_sec=peak, peak_matmul_size=peak_n, mfu=model_flops / peak,
      compile_s=compile_s, **memory, xla_flags=os.environ.get("XLA_FLAGS", ""))


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
      f"measured peak    {result['peak_flops_per_sec'] / 1e9:.1f} G "
      f"(float32 {result['peak_matmul_size']}^3 matmul)",
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


def clm_config():
  """configs/pretrain.py:<--preset> with the command line's overrides."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config(_PRESET.value)
  for flag, field in ((_REMAT, "remat"), (_ATTENTION, "attention"), (_DTYPE, "dtype")):
    if flag.value is not None:
      config.model[field] = flag.value
  if _BATCH.value is not None:
    config.data.global_batch_size = _BATCH.value
  if _SEQ_LEN.value is not None:
    config.data.seq_len = _SEQ_LEN.value
    config.model.max_length = max(config.model.max_length, _SEQ_LEN.value)
  return config


def run_clm() -> dict[str, Any]:
  result = benchmark_clm(clm_config(), steps=_STEPS.value, warmup=_WARMUP.value,
                         peak_sizes=[int(n) for n in _PEAK_SIZES.value],
                         peak_repeats=_PEAK_REPEATS.value)
  print(format_clm(result))
  return result


# One entry per workload; `generate` and `ppo` join here.
SUBCOMMANDS: dict[str, Callable[[], dict[str, Any]]] = {"clm": run_clm}


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    got = " ".join(argv[1:]) or "nothing"
    raise app.UsageError(f"expected one subcommand ({' | '.join(SUBCOMMANDS)}), got {got}")
  if _XLA_FLAGS.value:
    _apply_xla_flags()
  result = SUBCOMMANDS[argv[1]]()
  print(json.dumps(result, sort_keys=True))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)

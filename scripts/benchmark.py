"""Throughput benchmarks: the real jitted steps on synthetic data, with MFU and compiled memory.

  python -m scripts.benchmark clm                     # the `bench` shape, 10 timed steps
  python -m scripts.benchmark clm --steps 20 --remat full --attention dense --dtype bfloat16
  python -m scripts.benchmark generate                # 16 prompts x 64 tokens, 128 new tokens
  python -m scripts.benchmark ppo                     # one PPO iteration, 16 x 64-token replies
  python -m scripts.benchmark grpo                    # one GRPO iteration, 4 prompts x 4 replies
  python -m scripts.benchmark dpo                     # DPO step, 8 pairs of 128 + 384 tokens
  python -m scripts.benchmark --help

Subcommands (SUBCOMMANDS), each on random weights and random tokens, printing a readable block
and then one JSON line with every figure:

  clm       times the causal-LM train step of configs/pretrain.py:bench (d_model 512, 8
            layers, 8 heads, SwiGLU 1536, vocab 8192, sequence 512, batch 8) exactly as
            training runs it: same mesh, sharded state, jitted and donated step, AdamW. It
            prints tokens/s, model FLOP/s (models/flops.py: 6N + causal attention), the float32
            matmul FLOP/s measured on this machine in the same run, MFU (their ratio), the
            compiled step's memory and its compile time.
  generate  new tokens/s of the KV-cached sampler on the same model
            (scripts/benchmarks/generation.py): `--prompts` prompts of `--prompt_len` tokens,
            `--new_tokens` (default 128) sampled at `--temperature`, no early stop; prefill and
            decode apart.
  ppo       seconds per PPO iteration of configs/ppo.py:bench (scripts/benchmarks/ppo.py): a
            rollout of `--prompts` replies of `--new_tokens` (default 64) tokens, scoring by a
            reward model, reference and value head, one epoch of updates; split into
            generation, scoring and update. Needs no tokenizer, run directory or checkpoint.
  grpo      seconds per GRPO iteration of configs/grpo.py:bench (scripts/benchmarks/grpo.py):
            `--prompts` (default 4) random prompts x `--samples` (default 4) replies of
            `--new_tokens` (default 64) tokens, scored by a reward model, the reference's
            log-probs for the KL in the loss, one on-policy update (no pi_old pass;
            `--old_log_probs_forward` runs it, to compare); split as ppo.
  dpo       the DPO train step (sigmoid loss) on the `bench` model with a frozen reference in
            the step (scripts/benchmarks/dpo.py): `--pairs` rows, each a pair's chosen and
            rejected sequences back to back as the DPO stage packs them, every sequence a
            `--pair_prompt_len`-token prompt and a `--pair_reply_len`-token reply; tokens/s,
            model FLOP/s and MFU as for clm.

`generate` and `ppo` also report model FLOP/s of their forward (and backward) passes and the
MFU against the measured float32 matmul peak: context, since decoding is bound by memory and
per-step overheads rather than by matmul rate.

Flags are defined when the script runs, not when it is imported (`define_flags`), so tests
can import it next to other entry points with flags of the same names; a flag that the chosen
subcommand does not read is an error.

MFU's denominator: on a chip with a published dense peak (TPU, H100 / H200: parallel/peak.py),
that peak for the compute dtype, with the matmul rate measured in the same run beside it; on
CPU, the float32 matmul rate measured in the same run.

Platform settings (parallel/xla_settings.py), applied before JAX starts: on CPU the benchmark
sends every dot to XLA:CPU's Eigen GEMMs (`CPU_BENCHMARK_FLAGS`, only here, never for tests or
training) and, on Linux, runs under a host allocator that keeps freed memory for reuse
(`--allocator`, default: tcmalloc when installed, else tuned glibc;
scripts/benchmarks/host_allocator.py), re-executing itself once to set it. On GPU it sets the
XLA GPU flags training uses (`GPU_FLAGS`) and no host allocator. On one H100 / H200:

  python -m scripts.benchmark clm --preset 1b --dtype bfloat16 --batch 16 --remat full
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from absl import app, flags

from configs import grpo, ppo, pretrain
from models.attention_kernels import KERNELS
from parallel.xla_settings import apply_xla_settings, target_platform
from scripts.benchmarks import host_allocator
from scripts.benchmarks.clm import benchmark_clm, format_clm, format_peak, peak_figures
from scripts.benchmarks.dpo import benchmark_dpo, dpo_config, format_dpo
from scripts.benchmarks.generation import benchmark_generate, format_generate
from scripts.benchmarks.grpo import benchmark_grpo, format_grpo
from scripts.benchmarks.ppo import benchmark_ppo, format_ppo

# The flags each subcommand reads (`xla_flags` is read by all); any other one set is an error.
_COMMON_FLAGS = ("preset", "warmup", "attention", "dtype", "scan_layers", "peak_sizes",
                 "peak_repeats", "allocator")
_SUBCOMMAND_FLAGS = {
    "clm": _COMMON_FLAGS + ("remat", "steps", "batch", "seq_len"),
    "generate": _COMMON_FLAGS + ("prompts", "prompt_len", "new_tokens", "repeats",
                                 "temperature", "sample_weights", "decode_layers",
                                 "decode_gemm", "profile"),
    "ppo": _COMMON_FLAGS + ("remat", "prompts", "prompt_len", "new_tokens", "repeats",
                            "temperature"),
    "grpo": _COMMON_FLAGS + ("remat", "prompts", "samples", "prompt_len", "new_tokens",
                             "repeats", "temperature", "old_log_probs_forward",
                             "sample_weights"),
    "dpo": _COMMON_FLAGS + ("remat", "steps", "pairs", "pair_prompt_len", "pair_reply_len"),
}
_WARMUP = {"clm": 2, "generate": 1, "ppo": 1, "grpo": 1, "dpo": 1}
# clm: 10 timed steps; dpo: 3 (twice clm's tokens, policy and reference: ~2.7x its FLOPs).
_STEPS = {"clm": 10, "dpo": 3}
# generate: 128 new tokens per prompt; ppo: replies of 64 (configs/ppo.py:bench's rollout).
_NEW_TOKENS = {"generate": 128, "ppo": 64, "grpo": 64}
# generate, ppo: 16 prompts; grpo: 4 prompts of 4 samples each.
_PROMPTS = {"generate": 16, "ppo": 16, "grpo": 4}


def define_flags() -> None:
  """The script's flags; defined on use, not import: other entry points (scripts/convert.py's
  `dtype`, ...) define flags of the same names, and tests import several in one process."""
  # Every subcommand.
  flags.DEFINE_string("preset", "bench", "Preset of the workload's config: configs/pretrain.py "
                      "for clm and generate (and dpo's model), configs/ppo.py for ppo, "
                      "configs/grpo.py for grpo.")
  flags.DEFINE_integer("warmup", None, "Untimed steps / calls / iterations run after compiling "
                       "(default: clm 2, generate 1, ppo 1, dpo 1; ppo's first one compiles).")
  flags.DEFINE_enum("attention", None, list(KERNELS),
                    "Override config.model.attention (models/attention_kernels.py).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "Override config.model.dtype (compute dtype; params stay float32).")
  flags.DEFINE_list("peak_sizes", ["1024", "2048"],
                    "Square matmul sizes to measure the float32 peak at (best wins).")
  flags.DEFINE_integer("peak_repeats", 8, "Timed repeats per peak matmul size.")
  flags.DEFINE_bool("xla_flags", True, "Set the platform's XLA flags before JAX starts "
                    "(parallel/xla_settings.py: GPU_FLAGS on GPU, CPU_BENCHMARK_FLAGS on CPU).")
  flags.DEFINE_enum("allocator", "auto", list(host_allocator.CHOICES),
                    "Host memory allocator (Linux; scripts/benchmarks/host_allocator.py): auto = "
                    "tcmalloc when installed, else glibc tuned to keep freed memory; system = "
                    "as started.")
  # clm and ppo (the workloads with a backward pass).
  flags.DEFINE_enum("remat", None, ["none", "full", "save_dots"],
                    "Override config.model.remat.")
  flags.DEFINE_bool("scan_layers", None, "Override config.model.scan_layers (--noscan_layers: "
                    "the layers unrolled, one program per layer). Default: the preset's for "
                    "clm and ppo (bench: unrolled, scanned), scanned for generate.")
  # clm.
  flags.DEFINE_integer("steps", None, "clm, dpo: timed steps after warm-up (default: "
                       + ", ".join(f"{k} {v}" for k, v in _STEPS.items()) + ").")
  flags.DEFINE_integer("batch", None, "clm: override config.data.global_batch_size.")
  flags.DEFINE_integer("seq_len", None, "clm: override config.data.seq_len.")
  # generate, ppo and grpo.
  flags.DEFINE_integer("prompts", None, "generate, ppo, grpo: prompts per call / iteration "
                       "(default: " + ", ".join(f"{k} {v}" for k, v in _PROMPTS.items()) + ").")
  flags.DEFINE_integer("prompt_len", 64, "generate, ppo, grpo: tokens per (random) prompt.")
  flags.DEFINE_integer("new_tokens", None, "generate, ppo, grpo: new tokens per prompt (default: "
                       + ", ".join(f"{k} {v}" for k, v in _NEW_TOKENS.items()) + ").")
  flags.DEFINE_integer("repeats", 3, "generate, ppo, grpo: timed calls / iterations (median).")
  flags.DEFINE_float("temperature", 1.0, "generate, ppo, grpo: sampling temperature (0: "
                     "greedy).")
  flags.DEFINE_enum("sample_weights", "compute", ["compute", "int8"], "generate, grpo: the "
                    "sampler's matrices in the compute dtype or weight-only int8 "
                    "(models/quantize.py; grpo: rl.rollout_weights).")
  flags.DEFINE_enum("decode_layers", "auto", ["auto", "scan", "unrolled"], "generate: the "
                    "decode steps' layer loop (models/sampler.py make_sampler's unroll): auto = "
                    "unrolled on GPU, scanned elsewhere.")
  flags.DEFINE_enum("decode_gemm", "xla", ["xla", "pallas"], "generate: the decode steps' "
                    "products, XLA's GEMMs or models/decode_gemm.py's kernel (GPU).")
  flags.DEFINE_string("profile", "", "generate: trace one more call into this folder "
                      "(jax.profiler; scripts/trace_summary.py summarises it).")
  # grpo.
  flags.DEFINE_integer("samples", 4, "grpo: replies per prompt (the group size G).")
  flags.DEFINE_bool("old_log_probs_forward", False, "grpo: run the policy's pi_old pass even "
                    "though the one update is on-policy (what skipping it saves).")
  # dpo.
  flags.DEFINE_integer("pairs", 8, "dpo: preference pairs per step (one per row).")
  flags.DEFINE_integer("pair_prompt_len", 128, "dpo: prompt tokens of each sequence.")
  flags.DEFINE_integer("pair_reply_len", 384, "dpo: reply tokens of each sequence.")


def _override_model(config, names) -> None:
  """Sets config.model.<name> from each of the flags `names` that was given."""
  for name in names:
    value = flags.FLAGS[name].value
    if value is not None:
      config.model[name] = value


def _warmup(subcommand: str) -> int:
  value = flags.FLAGS.warmup
  return _WARMUP[subcommand] if value is None else value


def _steps(subcommand: str) -> int:
  value = flags.FLAGS.steps
  return _STEPS[subcommand] if value is None else value


def _prompts(subcommand: str) -> int:
  value = flags.FLAGS.prompts
  return _PROMPTS[subcommand] if value is None else value


def _new_tokens(subcommand: str) -> int:
  value = flags.FLAGS.new_tokens
  return _NEW_TOKENS[subcommand] if value is None else value


def add_mfu(result: dict[str, Any], dtype: str) -> dict[str, Any]:
  """`result` with the peak (`peak_figures`; `--peak_sizes`) and `mfu`, the ratio of its
  `model_flops_per_sec` to that peak."""
  peak = peak_figures([int(n) for n in flags.FLAGS.peak_sizes], flags.FLAGS.peak_repeats, dtype)
  return dict(result, **peak, mfu=result["model_flops_per_sec"] / peak["peak_flops_per_sec"])


def format_mfu(result: dict[str, Any]) -> str:
  """The peak and MFU lines of an `add_mfu` result."""
  return "\n".join([format_peak(result), f"MFU              {100 * result['mfu']:.1f}%"])


def clm_config():
  """configs/pretrain.py:<--preset> with the command line's overrides."""
  config = pretrain.get_config(flags.FLAGS.preset)
  _override_model(config, ("remat", "attention", "dtype", "scan_layers"))
  if flags.FLAGS.batch is not None:
    config.data.global_batch_size = flags.FLAGS.batch
  if flags.FLAGS.seq_len is not None:
    config.data.seq_len = flags.FLAGS.seq_len
    config.model.max_length = max(config.model.max_length, flags.FLAGS.seq_len)
  return config


def run_clm() -> dict[str, Any]:
  result = benchmark_clm(clm_config(), steps=_steps("clm"), warmup=_warmup("clm"),
                         peak_sizes=[int(n) for n in flags.FLAGS.peak_sizes],
                         peak_repeats=flags.FLAGS.peak_repeats)
  print(format_clm(result))
  return result


def run_generate() -> dict[str, Any]:
  config = pretrain.get_config(flags.FLAGS.preset)
  # Decoding runs the layers scanned unless --noscan_layers says otherwise: XLA:CPU runs the
  # unrolled decode step slower and compiles it far longer (README, "Benchmarks"), while the
  # train step (clm) is faster unrolled.
  config.model.scan_layers = True
  _override_model(config, ("attention", "dtype", "scan_layers"))
  f = flags.FLAGS
  result = add_mfu(benchmark_generate(
      config, batch=_prompts("generate"), prompt_len=f.prompt_len,
      max_new_tokens=_new_tokens("generate"), temperature=f.temperature, repeats=f.repeats,
      warmup=_warmup("generate"), weights=f.sample_weights,
      unroll={"auto": None, "scan": False, "unrolled": True}[f.decode_layers],
      gemm=f.decode_gemm, profile_dir=f.profile),
      config.model.dtype)
  print(format_generate(result))
  print(format_mfu(result))
  return result


def run_ppo() -> dict[str, Any]:
  config = ppo.get_config(flags.FLAGS.preset)
  _override_model(config, ("remat", "attention", "dtype", "scan_layers"))
  f = flags.FLAGS
  config.rl.temperature = f.temperature
  result = add_mfu(benchmark_ppo(config, prompts=_prompts("ppo"), new_tokens=_new_tokens("ppo"),
                                 prompt_len=f.prompt_len, repeats=f.repeats,
                                 warmup=_warmup("ppo")), config.model.dtype)
  print(format_ppo(result))
  print(format_mfu(result))
  return result


def run_grpo() -> dict[str, Any]:
  config = grpo.get_config(flags.FLAGS.preset)
  _override_model(config, ("remat", "attention", "dtype", "scan_layers"))
  f = flags.FLAGS
  config.rl.temperature = f.temperature
  result = add_mfu(benchmark_grpo(config, prompts=_prompts("grpo"), samples=f.samples,
                                  new_tokens=_new_tokens("grpo"), prompt_len=f.prompt_len,
                                  repeats=f.repeats, warmup=_warmup("grpo"),
                                  old_log_probs_forward=f.old_log_probs_forward,
                                  weights=f.sample_weights),
                   config.model.dtype)
  print(format_grpo(result))
  print(format_mfu(result))
  return result


def run_dpo() -> dict[str, Any]:
  f = flags.FLAGS
  config = dpo_config(f.preset, pairs=f.pairs, prompt_len=f.pair_prompt_len,
                      reply_len=f.pair_reply_len)
  _override_model(config, ("remat", "attention", "dtype", "scan_layers"))
  result = add_mfu(benchmark_dpo(config, prompt_len=f.pair_prompt_len,
                                 reply_len=f.pair_reply_len, steps=_steps("dpo"),
                                 warmup=_warmup("dpo")), config.model.dtype)
  print(format_dpo(result))
  print(format_mfu(result))
  return result


# One entry per workload.
SUBCOMMANDS: dict[str, Callable[[], dict[str, Any]]] = {
    "clm": run_clm, "generate": run_generate, "ppo": run_ppo, "grpo": run_grpo,
    "dpo": run_dpo}


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    got = " ".join(argv[1:]) or "nothing"
    raise app.UsageError(f"expected one subcommand ({' | '.join(SUBCOMMANDS)}), got {got}")
  subcommand = argv[1]
  # Only the flags defined here: absl's own (--verbosity, ...) may be set with any subcommand.
  ours = set().union(*_SUBCOMMAND_FLAGS.values())
  unread = sorted(name for name in ours - set(_SUBCOMMAND_FLAGS[subcommand])
                  if flags.FLAGS[name].present)
  if unread:
    raise app.UsageError(f"{subcommand} does not read --{', --'.join(unread)}")
  # Host settings are XLA:CPU's (the allocator of its per-step temporaries, its GEMM routing);
  # a GPU gets the XLA GPU flags instead (parallel/xla_settings.py), a TPU libtpu's defaults.
  platform = target_platform()
  allocator = "system"
  if platform == "cpu":
    try:
      allocator = host_allocator.reexec_with_allocator(flags.FLAGS.allocator, "scripts.benchmark")
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  if flags.FLAGS.xla_flags:
    apply_xla_settings(platform, benchmark=True)
  result = dict(SUBCOMMANDS[subcommand](), allocator=allocator)
  print(f"allocator        {allocator}")
  print(json.dumps(result, sort_keys=True))
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)

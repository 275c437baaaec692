"""scripts/benchmark.py: the `clm`, `generate` and `dpo` workloads on tiny models, the command
line.

`ppo` is tested in tests/training/test_rl.py (test_benchmark_ppo_splits_an_iteration).
"""

import importlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from configs.pretrain import get_config
from models.flops import matmul_params
from scripts import benchmark
from scripts.benchmarks import clm as clm_bench
from scripts.benchmarks.dpo import benchmark_dpo, dpo_config, format_dpo, random_pair_batch
from models.build import build_model_spec
from scripts.benchmarks.generation import (benchmark_generate, decode_bytes, format_generate,
                                          generation_flops)

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
            max_length=64)


def tiny_config():
  config = get_config("tiny")
  config.model.update(TINY)
  return config


def test_importing_defines_no_flags():
  # Flags come from define_flags() when the script runs; a flag defined at import would
  # already exist (and re-importing would raise DuplicateFlagError).
  before = set(flags.FLAGS)
  importlib.reload(benchmark)
  assert set(flags.FLAGS) == before
  assert not {"steps", "prompts", "new_tokens", "peak_sizes"} & before


def test_clm_on_a_tiny_model():
  config = tiny_config()
  config.data.update(dict(global_batch_size=8, seq_len=32))
  result = clm_bench.benchmark_clm(config, steps=2, warmup=1, peak_sizes=(512,),
                                   peak_repeats=2)
  assert math.isfinite(result["tokens_per_sec"]) and result["tokens_per_sec"] > 0
  np.testing.assert_allclose(result["tokens_per_sec"], 8 * 32 / result["step_s_median"])
  assert 0 < result["mfu"] < 1.5
  assert math.isfinite(result["final_loss"])
  for key in ("peak_memory_bytes", "temp_bytes", "argument_bytes", "output_bytes"):
    assert result[key] > 0, key
  assert "tokens/s" in clm_bench.format_clm(result)


def test_generate_counts_every_new_token(tmp_path):
  result = benchmark_generate(tiny_config(), batch=8, prompt_len=8, max_new_tokens=4,
                              repeats=2, warmup=0, profile_dir=str(tmp_path / "trace"))
  # --profile: one more call traced, in a trace scripts/trace_summary.py reads (a CPU has
  # host events only).
  from scripts import trace_summary
  events = trace_summary.load_events(trace_summary.find_trace(str(tmp_path / "trace")))
  assert trace_summary.summarize(events, device="/host:CPU")["launches"] > 0
  assert result["devices"] == 8 and result["batch"] == 8
  # No early stop: exactly prompts x new tokens, every call.
  assert result["new_tokens"] == 8 * 4
  assert result["new_tokens_per_sec"] > 0
  np.testing.assert_allclose(result["new_tokens_per_sec"], 8 * 4 / result["call_s_median"])
  assert result["compile_s"] > 0 and result["prefill_s"] > 0
  assert result["flops_per_call"] == generation_flops(tiny_config().model, 8, 8, 4)
  assert "new tokens/s" in format_generate(result)


def test_generation_flops_sum_every_token():
  cfg = tiny_config().model
  batch, prompt_len, new_tokens = 3, 10, 6
  head = 2 * cfg.d_model * cfg.vocab_size
  trunk = 2 * matmul_params(cfg) - head
  # QK^T and PV: 4 * head_dim FLOPs per head, layer and key attended.
  per_key = 4 * cfg.num_layers * cfg.num_heads * (cfg.d_model // cfg.num_heads)
  # The prompt: half the causal square of keys (models/flops.py), logits at its end only.
  prefill = prompt_len * trunk + per_key * prompt_len ** 2 // 2 + head
  # Each fed-back token: trunk and logits, attending to the prompt and the tokens so far.
  decode = sum(trunk + head + per_key * (prompt_len + j) for j in range(1, new_tokens))
  assert generation_flops(cfg, batch, prompt_len, new_tokens) == batch * (prefill + decode)


def test_pair_batch_is_chosen_then_rejected_with_one_prompt():
  """The DPO stage's packed layout (data/preferences.py): prompt 3 + reply 5 tokens per side,
  7 positions each (next-token layout), then padding to 16."""
  batch = random_pair_batch(np.random.default_rng(0), 2, 3, 5, 64, 16)
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 7 + [2] * 7 + [0] * 2)
  np.testing.assert_array_equal(batch["sides"], batch["segment_ids"])
  np.testing.assert_array_equal(batch["positions"][1], list(range(7)) * 2 + [0, 0])
  # Targets from the first reply token: positions 2..6 of each side.
  np.testing.assert_array_equal(batch["loss_mask"][0], ([0, 0] + [1] * 5) * 2 + [0, 0])
  np.testing.assert_array_equal(batch["inputs"][:, :3], batch["inputs"][:, 7:10])  # one prompt
  np.testing.assert_array_equal(batch["inputs"][:, 1:7], batch["targets"][:, :6])
  assert batch["inputs"][:, :14].min() >= 4 and (batch["example_ids"][1, :14] == 1).all()


def test_dpo_on_a_tiny_model():
  config = dpo_config("tiny", pairs=8, prompt_len=4, reply_len=12)
  config.model.update(TINY)
  result = benchmark_dpo(config, prompt_len=4, reply_len=12, steps=1, warmup=1)
  assert result["seq_len"] == 32 and result["tokens"] == 2 * 8 * 15
  np.testing.assert_allclose(result["tokens_per_sec"], 2 * 8 * 15 / result["step_s_median"])
  # Policy forward + backward and reference forward: 4 / 3 of a train step per real token.
  per_token = 6 * matmul_params(config.model) + 6 * 2 * 4 * 8 * 15
  assert result["flops_per_step"] == 2 * 8 * 15 * (per_token + per_token // 3)
  assert math.isfinite(result["final_loss"]) and result["devices"] == 8
  assert "8 pairs of 4 + 12 tokens" in format_dpo(result)


def run_script(*args):
  return subprocess.run([sys.executable, "-m", "scripts.benchmark", *args],
                        capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommands_flags():
  result = run_script("--help")
  # absl's --help exits with status 1 after printing the usage (as every script here does).
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr
  for flag in ("--steps:", "--prompts:", "--prompt_len:", "--new_tokens:", "--repeats:",
               "--temperature:"):
    assert flag in result.stdout, flag
  for subcommand in benchmark.SUBCOMMANDS:
    assert f"scripts.benchmark {subcommand}" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "--steps=3"), "generate does not read --steps"),
    (("clm", "--prompts=4", "--new_tokens=8"), "clm does not read --new_tokens, --prompts"),
    (("decode",), f"expected one subcommand ({' | '.join(benchmark.SUBCOMMANDS)}), got decode"),
    (("dpo", "--batch=4"), "dpo does not read --batch"),
])
def test_usage_errors(args, message):
  result = run_script(*args)
  assert result.returncode != 0 and message in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="allocator choice is Linux-only")
def test_clm_command_runs_under_the_chosen_allocator():
  # The real command line, shrunk: re-executes itself once under the allocator, then reports it.
  result = run_script("clm", "--preset=tiny", "--steps=1", "--warmup=0", "--batch=8",
                      "--seq_len=16", "--peak_sizes=64", "--peak_repeats=1",
                      "--allocator=glibc")
  assert result.returncode == 0, result.stderr[-2000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert figures["allocator"] == "glibc_tuned" and figures["tokens_per_sec"] > 0
  assert result.stdout.count("clm: ") == 1  # one run, not one per process


@pytest.mark.parametrize("tie", [False, True])
def test_decode_bytes_count_weights_as_sampled_and_the_whole_cache(tie):
  # TINY in bfloat16: d 32, 2 layers, 4 heads of 8, 2 KV heads, SwiGLU 64, vocab 64.
  cfg = tiny_config().model
  cfg.update(dtype="bfloat16", tie_embeddings=tie)
  spec = build_model_spec(cfg)
  got = decode_bytes(spec, batch=3, cache_len=10)
  per_layer = (32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64) * 2 + 2 * 32 * 4
  head = 64 * 32 * 2  # the LM head (or the tied table), bfloat16; the input table is not read
  assert got["weight_bytes"] == 2 * per_layer + 32 * 4 + head
  # k and v, 2 layers, 3 rows, 2 KV heads, 10 slots, head_dim 8, bfloat16; segment ids int32.
  assert got["cache_bytes"] == 2 * 2 * 3 * 2 * 10 * 8 * 2 + 3 * 10 * 4
  assert got["step_bytes"] == got["weight_bytes"] + got["cache_bytes"]
  # int8: a byte per matrix element plus a float32 scale per output channel (q: head x
  # head_dim, k and v: KV head x head_dim, o and down: d, gate and up: mlp), per layer.
  int8 = decode_bytes(spec, batch=3, cache_len=10, weights="int8")
  scales = (4 * 8 + 2 * 2 * 8 + 32 + 2 * 64 + 32) * 4
  per_layer = (32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64) + scales + 2 * 32 * 4
  head = 64 * 32 + 64 * 4  # int8 head, a scale per vocab row / column
  assert int8["weight_bytes"] == 2 * per_layer + 32 * 4 + head
  assert int8["cache_bytes"] == got["cache_bytes"]


def test_generate_reports_decode_bandwidth_utilisation():
  result = benchmark_generate(tiny_config(), batch=8, prompt_len=8, max_new_tokens=4,
                              repeats=1, warmup=0)
  spec = build_model_spec(tiny_config().model)
  assert result["decode_step_bytes"] == decode_bytes(spec, 8, 8 + 4 - 1)["step_bytes"]
  # (A tiny model's 3 decode steps can take less than the noise between the two timings:
  # the difference is floored at 1e-9 s.)
  np.testing.assert_allclose(result["decode_step_s"],
                             max(result["call_s_median"] - result["prefill_s"], 1e-9) / 3)
  np.testing.assert_allclose(result["bandwidth_utilisation"],
                             result["decode_step_bytes"] / result["decode_step_s"]
                             / result["memory_bandwidth"])
  # On CPU the denominator is the streaming rate measured in the same run.
  assert result["memory_bandwidth"] == result["measured_bandwidth"] > 1e8
  assert "bandwidth util." in format_generate(result)

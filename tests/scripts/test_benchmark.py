"""scripts/benchmark.py: the `clm` and `generate` workloads on tiny models, the command line.

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
from scripts.benchmarks.generation import benchmark_generate, format_generate, generation_flops

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
  result = benchmark.benchmark_clm(config, steps=2, warmup=1, peak_sizes=(512,),
                                   peak_repeats=2)
  assert math.isfinite(result["tokens_per_sec"]) and result["tokens_per_sec"] > 0
  np.testing.assert_allclose(result["tokens_per_sec"], 8 * 32 / result["step_s_median"])
  assert 0 < result["mfu"] < 1.5
  assert math.isfinite(result["final_loss"])
  for key in ("peak_memory_bytes", "temp_bytes", "argument_bytes", "output_bytes"):
    assert result[key] > 0, key
  assert "tokens/s" in benchmark.format_clm(result)


def test_generate_counts_every_new_token():
  result = benchmark_generate(tiny_config(), batch=8, prompt_len=8, max_new_tokens=4,
                              repeats=2, warmup=0)
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
    (("decode",), "expected one subcommand (clm | generate | ppo), got decode"),
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

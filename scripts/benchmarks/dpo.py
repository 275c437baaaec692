"""`benchmark_dpo`: seconds per DPO train step on the `bench` model, policy + frozen reference.

Run through `python -m scripts.benchmark dpo`. The step is the one training runs: the DPO
stage (training/stages/dpo.py, sigmoid loss) built by training/setup.py's `build_setup` (same
mesh, rules, sharded state, jitted and donated step, AdamW), with the frozen reference run
inside every step (`reference_mode='in_step'`: its forward pass over the same rows). Both
models are the `bench` model of configs/pretrain.py on random weights; no checkpoint,
tokenizer or data is read.

Batches are random tokens in the DPO stage's packed layout (data/preferences.py `encode_unit`):
each row holds one pair, its chosen and its rejected sequence back to back, each sequence the
same `prompt_len`-token prompt followed by its own `reply_len`-token reply, in the next-token
layout (a sequence of n tokens fills n - 1 positions), then padding to `seq_len` =
2 * (prompt_len + reply_len). That is where attention can skip: the rejected sequence's queries
never see the chosen sequence's keys (models/flash_attention.py).

Model FLOPs (models/flops.py conventions) count the real tokens of both sequences, each
attending within its own sequence: the policy's forward and backward (6N + causal attention
per token) plus the reference's forward (a third of that).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from configs import dpo, pretrain
from models.build import count_params
from models.flops import forward_flops_per_token, train_flops_per_token
from training.registry import get_stage
from training.setup import Frozen, build_setup


def dpo_config(preset: str = "bench", *, pairs: int = 8, prompt_len: int = 128,
               reply_len: int = 384) -> ml_collections.ConfigDict:
  """configs/dpo.py (sigmoid) on configs/pretrain.py:<preset>'s model, one pair per row, the
  reference in the step."""
  config = dpo.get_config("tiny")
  config.model = pretrain.get_config(preset).model
  config.init_from = ""
  # Never read: the benchmark makes the reference's weights (random) itself.
  config.objective.update(dict(reference="random-weights", reference_mode="in_step"))
  config.data.update(dict(seq_len=2 * (prompt_len + reply_len), global_batch_size=pairs))
  return config


def random_pair_batch(rng: np.random.Generator, pairs: int, prompt_len: int, reply_len: int,
                      vocab: int, seq_len: int) -> dict[str, np.ndarray]:
  """`pairs` rows, each [chosen | rejected | padding], in data/preferences.py's layout."""
  n = prompt_len + reply_len - 1  # positions per sequence (next-token layout)
  if 2 * n > seq_len:
    raise ValueError(f"two sequences of {n} positions do not fit seq_len {seq_len}")
  shape = (pairs, seq_len)
  batch = {k: np.zeros(shape, np.int32) for k in ("inputs", "targets", "segment_ids",
                                                  "positions", "sides", "example_ids")}
  batch.update(loss_mask=np.zeros(shape, np.float32), margins=np.zeros(shape, np.float32))
  # Ids from 4 up: 0-3 are the tokenizers' special symbols (pad, unk, BOS, EOS).
  prompts = rng.integers(4, vocab, (pairs, prompt_len))
  for side in (1, 2):
    tokens = np.concatenate([prompts, rng.integers(4, vocab, (pairs, reply_len))], axis=1)
    cols = slice((side - 1) * n, side * n)
    batch["inputs"][:, cols], batch["targets"][:, cols] = tokens[:, :-1], tokens[:, 1:]
    # Targets from the first reply token on (data/preferences.py: completion targets).
    batch["loss_mask"][:, cols] = np.arange(1, n + 1) >= prompt_len
    batch["segment_ids"][:, cols] = batch["sides"][:, cols] = side
    batch["positions"][:, cols] = np.arange(n)
    batch["example_ids"][:, cols] = np.arange(pairs)[:, None]
  return batch


def random_frozen(setup, seed: int) -> Frozen:
  """The stage's frozen models (the reference) on random weights, in their shardings."""
  frozen = setup.load_frozen(abstract=True)
  params = {name: jax.jit(spec.init, out_shardings=frozen.shardings[name])(
      jax.random.PRNGKey(seed + 1 + i)) for i, (name, spec) in enumerate(frozen.specs.items())}
  return Frozen(frozen.specs, params, frozen.shardings)


def benchmark_dpo(config: ml_collections.ConfigDict, *, prompt_len: int = 128,
                  reply_len: int = 384, steps: int = 3, warmup: int = 1,
                  seed: int = 0) -> dict[str, Any]:
  """Times the DPO train step of `config` (a `dpo_config`) on random pair batches.

  Returns:
    A flat dict: `step_s_median` / `_mean` / `_min` over `steps` timed steps, `tokens_per_sec`
    (real tokens of both sequences, from the median), `model_flops_per_sec`, `compile_s`, the
    shapes and the final loss.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  pairs, seq_len = config.data.global_batch_size, config.data.seq_len
  setup = build_setup(config, get_stage("dpo"), total_updates=max(config.train.steps,
                                                                  warmup + steps))
  state = setup.fresh_state()
  frozen = random_frozen(setup, config.seed)
  step = setup.train_step(frozen)
  rng = np.random.default_rng(seed)
  batches = [jax.device_put(random_pair_batch(rng, pairs, prompt_len, reply_len,
                                              config.model.vocab_size, seq_len),
                            setup.data_sharding) for _ in range(2)]
  start = time.perf_counter()
  compiled = step.lower(state, batches[0], frozen.params).compile()
  compile_s = time.perf_counter() - start
  metrics = None
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 2], frozen.params)
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2], frozen.params)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  loss_sum, loss_weight = metrics["loss"]
  step_s = statistics.median(times)
  sequence = prompt_len + reply_len - 1
  tokens = 2 * pairs * sequence
  flops = tokens * (train_flops_per_token(config.model, sequence)
                    + forward_flops_per_token(config.model, sequence))
  return dict(
      subcommand="dpo", devices=setup.mesh.size, platform=jax.devices()[0].platform,
      params=count_params(setup.spec.shapes), pairs=pairs, prompt_len=prompt_len,
      reply_len=reply_len, seq_len=seq_len, dtype=config.model.dtype, remat=config.model.remat,
      attention=config.model.attention, loss_type=config.objective.loss_type, steps=steps,
      warmup=warmup, step_s_median=step_s, step_s_mean=statistics.fmean(times),
      step_s_min=min(times), tokens=tokens, tokens_per_sec=tokens / step_s,
      flops_per_step=flops, model_flops_per_sec=flops / step_s, compile_s=compile_s,
      final_loss=float(loss_sum) / max(float(loss_weight), 1.0))


def format_dpo(result: dict[str, Any]) -> str:
  """Human-readable lines of a `benchmark_dpo` result."""
  return "\n".join([
      f"dpo: {result['params'] / 1e6:.1f}M params (policy; + a frozen reference), "
      f"{result['pairs']} pairs of {result['prompt_len']} + {result['reply_len']} tokens "
      f"(rows of {result['seq_len']}), {result['loss_type']} loss, {result['dtype']}, remat "
      f"{result['remat']}, attention {result['attention']}, {result['devices']} "
      f"{result['platform']} device(s)",
      f"step time        {result['step_s_median'] * 1e3:.1f} ms median "
      f"(mean {result['step_s_mean'] * 1e3:.1f}, min {result['step_s_min'] * 1e3:.1f}, "
      f"{result['steps']} steps)",
      f"tokens/s         {result['tokens_per_sec']:,.0f} (both sequences of each pair)",
      f"model FLOP/s     {result['model_flops_per_sec'] / 1e9:.1f} G (policy forward + "
      "backward, reference forward)",
      f"compile          {result['compile_s']:.1f} s",
      f"final loss       {result['final_loss']:.3f}",
  ])

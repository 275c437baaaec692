"""`benchmark_ppo`: seconds per PPO iteration on the `bench` model, split into its phases.

Run through `python -m scripts.benchmark ppo`. One iteration exactly as training runs it
(training/rl/loop.py RLTrainer.iteration, same mesh, rules, jitted sampler and donated train
step): a rollout of `prompts` replies of `new_tokens` tokens to random prompts of `prompt_len`
tokens, scored by a reward model (random weights, the policy's shape) with reference log-probs
and values, then one epoch of PPO updates (`config.rl.minibatches` minibatches). The phases:

  generate_s   the sampler (prefill + KV-cached decode loop)
  score_s      reward model at the last token + policy / reference log-probs and values
  update_s     the PPO train steps

All weights are random (no checkpoint is read) and no tokenizer is needed: prompts are random
ids and replies are scored as tokens, never text, so a fresh checkout runs it. Stop ids lie
outside the vocabulary (`StopIdsOnly`), so every reply runs to `new_tokens`: each iteration
does the same work and generates exactly `prompts * new_tokens` tokens. The figures are
throughput, not learning.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import ml_collections
import numpy as np

import models  # noqa: F401  (sets flax's variable-sharding mode before any module is built)
from configs import ppo as ppo_config
from data.conversation import Prompt, Turn
from data.prompts import PromptItem
from models.build import count_params
from models.flops import forward_flops_per_token
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from scripts.benchmarks.generation import generation_flops
from training.programs import StopIdsOnly
from training.rl.loop import RLTrainer, initial_kl_coef
from training.rl.rewards import RewardModelScorer


def ppo_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Model FLOPs of one PPO iteration of `config` by phase (models/flops.py conventions).

  Rows are `max_prompt_len + max_new_tokens` tokens (every reply runs to the end). Scoring is
  three forward passes: the reward model (trunk only, its scalar head is negligible), the
  policy and the reference (trunk over the shifted row, LM head over the reply positions).
  An update is a policy forward plus its backward (twice the forward), per epoch. A critic
  (`config.value.source` 'model') adds a trunk to each policy pass.

  Returns:
    {'generate', 'score', 'update'}: FLOPs of each phase.
  """
  cfg, rl = config.model, config.rl
  rows = rl.prompts_per_iteration * rl.samples_per_prompt
  length = rl.max_prompt_len + rl.max_new_tokens
  head = 2 * cfg.d_model * cfg.vocab_size
  # Per token, causal attention over the whole row.
  trunk = forward_flops_per_token(cfg, length) - head
  critic = trunk if config.value.source == "model" else 0
  policy = rows * ((length - 1) * (trunk + critic) + rl.max_new_tokens * head)
  reference = rows * ((length - 1) * trunk + rl.max_new_tokens * head)
  return dict(generate=generation_flops(cfg, rows, rl.max_prompt_len, rl.max_new_tokens),
              score=rows * length * trunk + policy + reference,
              update=rl.epochs * 3 * policy)


def run_rl_iterations(config: ml_collections.ConfigDict, *, prompts: int, prompt_len: int,
                      iterations: int, seed: int, **trainer_kwargs
                      ) -> tuple[RLTrainer, list[dict[str, Any]]]:
  """The trainer and each iteration's record of an `RLTrainer` of `config` run `iterations`
  times on random
  prompts (`prompts` per iteration of `prompt_len` ids) and a random reward model: the real
  rollout, scoring and update, with no tokenizer, data files or checkpoint."""
  rng = np.random.default_rng(seed)
  # Ids from 4 up: 0-3 are the tokenizers' special symbols (pad, unk, BOS, EOS).
  items = [PromptItem(Prompt((Turn("user", f"random prompt {i}"),)),
                      tuple(int(t) for t in rng.integers(4, config.model.vocab_size,
                                                         prompt_len)))
           for i in range(prompts * iterations)]
  reward_model = RewardModelScorer.random(config.model, make_mesh(config.mesh),
                                          get_rules(config.mesh.rules))
  trainer = RLTrainer(config, tokenizer=StopIdsOnly(), train_items=items,
                      reward_model=reward_model, **trainer_kwargs)
  state = jax.block_until_ready(trainer.fresh_state())
  kl_coef = initial_kl_coef(config)
  records = []
  for i in range(iterations):
    state, record, kl_coef = trainer.iteration(state, i, kl_coef)
    records.append(record)
  return trainer, records


def benchmark_ppo(config: ml_collections.ConfigDict | None = None, *, prompts: int = 16,
                  new_tokens: int = 64, prompt_len: int = 64, repeats: int = 3,
                  warmup: int = 1, seed: int = 0) -> dict[str, Any]:
  """Times PPO iterations of `config` (default configs/ppo.py:bench).

  Args:
    config: a configs/ppo.py config; its model, mesh, optimizer and `rl` settings are used,
      with `prompts_per_iteration`, `max_prompt_len`, `max_new_tokens` set from the arguments,
      one sample per prompt, one epoch, no checkpoint, a random-weight reward model of the
      policy's shape and no reward function.
    prompts: replies per iteration.
    new_tokens: tokens per reply.
    prompt_len: tokens per (random) prompt.
    repeats: timed iterations.
    warmup: untimed iterations before them (the first one compiles).
    seed: of the prompts.

  Returns:
    A flat dict: `iteration_s`, `generate_s`, `score_s`, `update_s` (medians over `repeats`
    timed iterations) and their `*_mean`, `new_tokens` (generated per iteration, from the
    rollouts' masks), `new_tokens_per_sec` (over the generation time), `updates` per
    iteration, `*_flops` per iteration by phase (`ppo_flops`) and `model_flops_per_sec`
    (their sum over the iteration time), the shapes, and `first_iteration_s`.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  config = ppo_config.get_config("bench") if config is None else config
  config = config.copy_and_resolve_references()
  config.init_from = ""
  config.reward.update(dict(function="", model=""))
  # The template only names the stop symbol here (prompts are ids): StopIdsOnly has one.
  config.data.chat_template = "default"
  config.rl.update(dict(prompts_per_iteration=prompts, samples_per_prompt=1,
                        max_prompt_len=prompt_len, max_new_tokens=new_tokens, epochs=1))
  config.train.update(dict(steps=warmup + repeats, eval_every=0))
  trainer, records = run_rl_iterations(config, prompts=prompts, prompt_len=prompt_len,
                                       iterations=warmup + repeats, seed=seed)
  timed = records[warmup:]
  median = lambda key: statistics.median(r[f"perf/{key}"] for r in timed)
  mean = lambda key: statistics.fmean(r[f"perf/{key}"] for r in timed)
  response_length = statistics.fmean(r["train/response_length"] for r in timed)
  out = {"subcommand": "ppo", "devices": trainer.mesh.size,
         "platform": jax.devices()[0].platform, "params": count_params(trainer.spec.shapes),
         "dtype": config.model.dtype, "attention": config.model.attention,
         "remat": config.model.remat, "temperature": config.rl.temperature,
         "prompts": prompts, "prompt_len": prompt_len, "new_tokens_per_reply": new_tokens,
         "updates": config.rl.epochs * config.rl.minibatches, "repeats": repeats,
         "warmup": warmup, "first_iteration_s": records[0]["perf/iteration_s"],
         "response_length": response_length,
         "new_tokens": int(round(prompts * response_length))}
  for key in ("iteration_s", "generate_s", "score_s", "update_s"):
    out[key], out[f"{key}_mean"] = median(key), mean(key)
  out["new_tokens_per_sec"] = out["new_tokens"] / out["generate_s"]
  flops = ppo_flops(config)
  out.update({f"{phase}_flops": f for phase, f in flops.items()})
  out["model_flops_per_sec"] = sum(flops.values()) / out["iteration_s"]
  return out


def format_ppo(result: dict[str, Any]) -> str:
  """Human-readable lines of a `benchmark_ppo` result."""
  rate = lambda phase: result[f"{phase}_flops"] / result[f"{phase}_s"] / 1e9
  return "\n".join([
      f"ppo: {result['params'] / 1e6:.1f}M params (policy + value head), {result['prompts']} "
      f"prompts x {result['new_tokens_per_reply']} new tokens (prompts of "
      f"{result['prompt_len']}), {result['updates']} updates, {result['dtype']}, "
      f"{result['devices']} {result['platform']} device(s)",
      f"iteration        {result['iteration_s']:.2f} s median of {result['repeats']} (first, "
      f"compiling: {result['first_iteration_s']:.1f} s)",
      f"  generation     {result['generate_s']:.2f} s ({result['new_tokens_per_sec']:,.0f} "
      f"new tokens/s, {rate('generate'):.1f} G model FLOP/s)",
      f"  scoring        {result['score_s']:.2f} s (reward model, reference, policy, values; "
      f"{rate('score'):.1f} G model FLOP/s)",
      f"  update         {result['update_s']:.2f} s ({rate('update'):.1f} G model FLOP/s)",
      f"model FLOP/s     {result['model_flops_per_sec'] / 1e9:.1f} G over the iteration",
  ])

"""`benchmark_grpo`: seconds per GRPO iteration on the `bench` model, split into its phases.

Run through `python -m scripts.benchmark grpo`. One iteration exactly as training runs it
(training/rl/loop.py RLTrainer.iteration, same mesh, rules, jitted sampler and donated train
step) of configs/grpo.py:bench: `prompts` random prompts of `prompt_len` tokens, `samples`
replies of `new_tokens` tokens to each (a group), scored by a reward model of the policy's
shape (random weights, so every group's scores differ and every reply has an advantage), the
reference's log-probs for the k3 KL in the loss, then one update. The phases:

  generate_s   the sampler (prefill + KV-cached decode loop)
  score_s      reward model at the last token + reference log-probs, and the policy's own
               log-probs (pi_old) only where the update needs them
  update_s     the GRPO train step(s)
  behaviour_s  int8 rollouts only (`weights="int8"`): the behaviour policy's log-probs, a
               forward pass on the quantized weights (training/rl/offpolicy.py)

With one epoch of one minibatch (the preset) the update is on-policy and the rollout skips the
policy's pass (training/rl/loop.py); `old_log_probs_forward=True` runs it anyway, to measure
what the skip saves. As in scripts/benchmarks/ppo.py, prompts are random ids and no tokenizer,
run directory or checkpoint is read; stop ids lie outside the vocabulary, so every reply runs
to `new_tokens` and each iteration does the same work.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import ml_collections

import models  # noqa: F401  (sets flax's variable-sharding mode before any module is built)
from configs import grpo as grpo_config
from models.build import count_params
from scripts.benchmarks.ppo import ppo_flops, run_rl_iterations


def grpo_flops(config: ml_collections.ConfigDict, old_log_probs_forward: bool,
               behaviour_forward: bool = False) -> dict[str, int]:
  """Model FLOPs of one GRPO iteration of `config` by phase: scripts/benchmarks/ppo.py's
  `ppo_flops` with no value function, less the policy's scoring pass when it is skipped, plus
  the behaviour pass of int8 rollouts (`behaviour_forward`).

  Returns:
    {'generate', 'score', 'update'} (and 'behaviour'): FLOPs of each phase.
  """
  flops = ppo_flops(config)
  # An update is the policy's forward and backward (3 forwards) per epoch.
  policy_forward = flops["update"] // (3 * config.rl.epochs)
  if not old_log_probs_forward:
    flops["score"] -= policy_forward
  if behaviour_forward:
    flops["behaviour"] = policy_forward
  return flops


def benchmark_grpo(config: ml_collections.ConfigDict | None = None, *, prompts: int = 4,
                   samples: int = 4, new_tokens: int = 64, prompt_len: int = 64,
                   repeats: int = 3, warmup: int = 1, old_log_probs_forward: bool = False,
                   seed: int = 0, weights: str = "compute") -> dict[str, Any]:
  """Times GRPO iterations of `config` (default configs/grpo.py:bench).

  Args:
    config: a configs/grpo.py config; its model, mesh, optimizer, objective and `rl` schedule
      are used, with the sizes below, no checkpoint, a random-weight reward model of the
      policy's shape and no reward function.
    prompts: prompts per iteration.
    samples: replies per prompt (G).
    new_tokens: tokens per reply.
    prompt_len: tokens per (random) prompt.
    repeats: timed iterations.
    warmup: untimed iterations before them (the first one compiles).
    old_log_probs_forward: run the policy's scoring pass even where the update is on-policy.
    seed: of the prompts.
    weights: the rollouts' sampling weights, `config.rl.rollout_weights` ("compute" or
      "int8": then pi_old's pass runs and mu's pass is timed as `behaviour_s`).

  Returns:
    A flat dict: `iteration_s`, `generate_s`, `score_s`, `update_s` (and `behaviour_s` with
    int8 rollouts; medians over `repeats` timed iterations) and their `*_mean`, `new_tokens` per iteration, `new_tokens_per_sec`,
    `updates` per iteration, `old_log_probs_forward` (whether the pass ran), `*_flops` per
    iteration by phase (`grpo_flops`), `model_flops_per_sec`, the shapes, and
    `first_iteration_s`.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  config = grpo_config.get_config("bench") if config is None else config
  config = config.copy_and_resolve_references()
  config.init_from = ""
  config.reward.update(dict(function="", model=""))
  config.data.chat_template = "default"
  config.rl.update(dict(prompts_per_iteration=prompts, samples_per_prompt=samples,
                        max_prompt_len=prompt_len, max_new_tokens=new_tokens,
                        rollout_weights=weights))
  config.train.update(dict(steps=warmup + repeats, eval_every=0))
  trainer, records = run_rl_iterations(
      config, prompts=prompts, prompt_len=prompt_len, iterations=warmup + repeats, seed=seed,
      old_log_probs_forward=True if old_log_probs_forward else None)
  timed = records[warmup:]
  median = lambda key: statistics.median(r[f"perf/{key}"] for r in timed)
  mean = lambda key: statistics.fmean(r[f"perf/{key}"] for r in timed)
  response_length = statistics.fmean(r["train/response_length"] for r in timed)
  rows = prompts * samples
  out = {"subcommand": "grpo", "devices": trainer.mesh.size,
         "platform": jax.devices()[0].platform, "params": count_params(trainer.spec.shapes),
         "dtype": config.model.dtype, "attention": config.model.attention,
         "remat": config.model.remat, "temperature": config.rl.temperature,
         "loss_type": config.objective.loss_type, "kl_coef": config.objective.kl_coef,
         "prompts": prompts, "samples": samples, "prompt_len": prompt_len,
         "new_tokens_per_reply": new_tokens,
         "updates": config.rl.epochs * config.rl.minibatches, "repeats": repeats,
         "warmup": warmup, "old_log_probs_forward": trainer.old_log_probs_forward,
         "weights": weights,
         "first_iteration_s": records[0]["perf/iteration_s"],
         "response_length": response_length, "new_tokens": int(round(rows * response_length)),
         "final_loss": timed[-1]["train/loss"]}
  behaviour = weights != "compute"
  for key in ("iteration_s", "generate_s", "score_s", "update_s") + (
      ("behaviour_s",) if behaviour else ()):
    out[key], out[f"{key}_mean"] = median(key), mean(key)
  out["new_tokens_per_sec"] = out["new_tokens"] / out["generate_s"]
  flops = grpo_flops(config, trainer.old_log_probs_forward, behaviour)
  out.update({f"{phase}_flops": f for phase, f in flops.items()})
  out["model_flops_per_sec"] = sum(flops.values()) / out["iteration_s"]
  return out


def format_grpo(result: dict[str, Any]) -> str:
  """Human-readable lines of a `benchmark_grpo` result."""
  rate = lambda phase: result[f"{phase}_flops"] / result[f"{phase}_s"] / 1e9
  old = ("policy's pi_old pass" if result["old_log_probs_forward"]
         else "no pi_old pass: on-policy, skipped")
  return "\n".join([
      f"grpo: {result['params'] / 1e6:.1f}M params, {result['prompts']} prompts x "
      f"{result['samples']} samples x {result['new_tokens_per_reply']} new tokens (prompts of "
      f"{result['prompt_len']}), {result['loss_type']} loss, KL coef {result['kl_coef']}, "
      f"{result['updates']} update(s), {result['dtype']}"
      + (" with int8 rollouts" if result.get("weights") == "int8" else "")
      + f", {result['devices']} "
      f"{result['platform']} device(s)",
      f"iteration        {result['iteration_s']:.2f} s median of {result['repeats']} (first, "
      f"compiling: {result['first_iteration_s']:.1f} s)",
      f"  generation     {result['generate_s']:.2f} s ({result['new_tokens_per_sec']:,.0f} "
      f"new tokens/s, {rate('generate'):.1f} G model FLOP/s)",
      f"  scoring        {result['score_s']:.2f} s (reward model, reference, {old}; "
      f"{rate('score'):.1f} G model FLOP/s)",
      f"  update         {result['update_s']:.2f} s ({rate('update'):.1f} G model FLOP/s)",
  ] + ([f"  behaviour      {result['behaviour_s']:.2f} s (int8 rollouts' mu pass; "
        f"{rate('behaviour'):.1f} G model FLOP/s)"] if "behaviour_s" in result else []) + [
      f"model FLOP/s     {result['model_flops_per_sec'] / 1e9:.1f} G over the iteration",
  ])

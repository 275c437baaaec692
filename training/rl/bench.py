"""`benchmark_ppo`: seconds per PPO iteration on the `bench` model, split into its phases.

One iteration exactly as training runs it (training/rl/loop.py RLTrainer.iteration, same
mesh, rules, jitted sampler and donated train step): a rollout of `prompts` replies of
`new_tokens` tokens to random prompts of `prompt_len` tokens, scored by a reward model
(random weights, the bench shape) with reference log-probs and values, then one epoch of
PPO updates (`config.rl.minibatches` minibatches). The phases:

  generate_s   the sampler (prefill + KV-cached decode loop)
  score_s      reward model at the last token + policy / reference log-probs and values
  update_s     the PPO train steps

All weights are random (no checkpoint is read): the figures are throughput, not learning.
Every row runs to `new_tokens` unless a random stop token comes first (the loop runs while
any row lives, so the work per call is the same).
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import jax
import numpy as np

from data.conversation import Prompt, Turn
from training.rl.rollout import PromptItem


def _tokenizer(path: str):
  """A tokenizer for the stop / pad / EOS ids (replies are scored as tokens, never text)."""
  from data import tiny_world
  from data.tokenizer import Tokenizer, train_sentencepiece
  if path:
    return Tokenizer.load(path)
  folder = tempfile.mkdtemp(prefix="bench_ppo_")
  return Tokenizer.load(train_sentencepiece(tiny_world.generate_documents("train", 300),
                                            f"{folder}/spm", 384))


def benchmark_ppo(config=None, *, prompts: int = 16, new_tokens: int = 64, prompt_len: int = 64,
                  repeats: int = 3, warmup: int = 1, tokenizer_path: str = "",
                  seed: int = 0) -> dict[str, Any]:
  """Times PPO iterations of `config` (default configs/ppo.py:bench).

  Returns:
    A flat dict: `iteration_s`, `generate_s`, `score_s`, `update_s` (medians over `repeats`
    timed iterations after `warmup` compiling ones), their `*_mean`, `new_tokens_per_sec`
    (rollout tokens over the generation time), `updates` per iteration, the shapes, and
    `first_iteration_s` (compile included).
  """
  import models  # noqa: F401  (flax's variable-sharding mode)
  from configs import ppo
  from models.build import count_params
  from parallel.mesh import make_mesh
  from parallel.rules import get_rules
  from training.rl.loop import RLTrainer, initial_kl_coef
  from training.rl.rewards import RewardModelScorer

  config = ppo.get_config("bench") if config is None else config
  config = config.copy_and_resolve_references()
  config.init_from = ""
  config.reward.update(dict(function="", model=""))
  config.rl.update(dict(prompts_per_iteration=prompts, samples_per_prompt=1,
                        max_prompt_len=prompt_len, max_new_tokens=new_tokens, epochs=1))
  config.train.update(dict(steps=warmup + repeats, eval_every=0))
  tokenizer = _tokenizer(tokenizer_path)
  rng = np.random.default_rng(seed)
  items = [PromptItem(Prompt((Turn("user", f"random prompt {i}"),)),
                      tuple(int(t) for t in rng.integers(4, config.model.vocab_size,
                                                         prompt_len)))
           for i in range(prompts * (warmup + repeats))]
  reward_model = RewardModelScorer("", make_mesh(config.mesh), get_rules(config.mesh.rules),
                                   model_config=config.model)
  trainer = RLTrainer(config, tokenizer=tokenizer, train_items=items, reward_model=reward_model)
  state = jax.block_until_ready(trainer.fresh_state())
  kl_coef = initial_kl_coef(config)
  records = []
  for i in range(warmup + repeats):
    state, record, kl_coef = trainer.iteration(state, i, kl_coef)
    records.append(record)
  timed = records[warmup:]
  median = lambda key: statistics.median(r[f"perf/{key}"] for r in timed)
  mean = lambda key: statistics.fmean(r[f"perf/{key}"] for r in timed)
  out = {"subcommand": "ppo", "devices": trainer.mesh.size,
         "platform": jax.devices()[0].platform, "params": count_params(trainer.spec.shapes),
         "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
         "updates": config.rl.epochs * config.rl.minibatches, "repeats": repeats,
         "first_iteration_s": records[0]["perf/iteration_s"],
         "response_length": statistics.fmean(r["train/response_length"] for r in timed)}
  for key in ("iteration_s", "generate_s", "score_s", "update_s"):
    out[key], out[f"{key}_mean"] = median(key), mean(key)
  out["new_tokens_per_sec"] = prompts * out["response_length"] / out["generate_s"]
  return out


def format_ppo(result: dict[str, Any]) -> str:
  """Human-readable lines of a `benchmark_ppo` result."""
  return "\n".join([
      f"ppo: {result['params'] / 1e6:.1f}M params (policy + value head), {result['prompts']} "
      f"prompts x {result['new_tokens']} new tokens (prompts of {result['prompt_len']}), "
      f"{result['updates']} updates, {result['devices']} {result['platform']} device(s)",
      f"iteration        {result['iteration_s']:.2f} s median (first, compiling: "
      f"{result['first_iteration_s']:.1f} s)",
      f"  generation     {result['generate_s']:.2f} s ({result['new_tokens_per_sec']:,.0f} "
      "new tokens/s)",
      f"  scoring        {result['score_s']:.2f} s (reward model, reference, policy, values)",
      f"  update         {result['update_s']:.2f} s",
  ])

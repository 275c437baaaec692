"""PPO (RLHF): the SFT policy trained on its own samples against a reward, with a KL penalty.

On the tiny world, after pretraining and SFT (configs/pretrain.py, configs/sft.py), with the
verifiable `tiny_answer` reward (1 when the reply states the question's answer):

  python -m scripts.train --config configs/ppo.py:tiny --workdir runs/ppo_tiny \\
      --config.init_from=runs/sft_tiny

or against a trained reward model (configs/reward.py), its value function started from it:

  python -m scripts.train --config configs/ppo.py:tiny --workdir runs/ppo_rm_tiny \\
      --config.init_from=runs/sft_tiny --config.reward.function= \\
      --config.reward.model=runs/reward_tiny --config.value.source=model

An RL run counts iterations (training/rl/loop.py): `train.steps` iterations, each sampling
`rl.prompts_per_iteration` x `rl.samples_per_prompt` replies and making `rl.epochs` x
`rl.minibatches` optimizer updates; `train.eval_every`, `train.log_every` and
`checkpoint.every_steps` count iterations too. metrics.jsonl reports train/score, kl,
entropy, clip_fraction, approx_kl, value_loss, explained_variance, response_length, ... and,
on held-out prompts at iteration 0 (the SFT policy) and every `eval_every` iterations,
greedy eval/reward, eval/answer_accuracy, eval/kl and, over `eval.samples` sampled replies
per prompt, eval/sampled_reward, eval/sampled_answer_accuracy, eval/sampled_kl
(training/rl/evaluation.py).

Prompts: `data.source` tiny_world (`data.tiny_prompts`: 'unseen', the default, trains on half
of the questions the SFT stage never saw and holds out the other half; 'sft' trains on the SFT
stage's own questions) or files (`data.train_files` / `eval_files` of {prompt, answer?}
records, docs/formats.md). docs/results_rl.md has the tiny runs' figures.

Sections: `rl` (sampling and update schedule, DAPO's dynamic sampling, packed updates:
training/rl/packing.py, off-policy overlapped rollouts with staleness, rollout_devices and
max_importance_ratio: training/rl/offpolicy.py, int8 rollout_weights: models/quantize.py),
`reward` (function
and / or reward-model run, missing-stop penalty, DAPO's overlong shaping:
training/rl/rewards.py), `value` (source 'head' on the policy or a
separate 'model'; `init_from` of the latter, '' = reward.model, else init_from), `eval`,
and `objective` (PPO's: kl_coef, kl_estimator k1 | k2 | k3, adaptive_kl with target_kl and
kl_horizon, gamma, lam, whiten_advantages, clip_eps, value_clip, vf_coef, entropy_coef,
reference: the frozen reference run, '' = init_from). Presets: tiny, bench (the benchmark
shape, scripts/benchmark.py ppo), 1b (your own prompt files in ChatML).
"""

import ml_collections

from configs import base
from configs.models import model_config


def add_rl_sections(config: ml_collections.ConfigDict) -> None:
  """The data, rl, reward, value and eval sections shared by every RL stage."""
  # The earlier run's tokenizer, following --config.init_from (configs/base.py).
  config.data.tokenizer = base.tokenizer_of_run(config.get_ref("init_from"))
  config.data.update(dict(
      source="tiny_world",     # 'tiny_world' (its {prompt, answer} records) | 'files'
      chat_template="default",  # 'default' | 'chatml' (data/chat_template.py)
      # source tiny_world: 'unseen' (questions the SFT stage never saw, half to train on and
      # half held out) | 'sft' (the SFT training questions; held out: the validation ones).
      # See data/sources.py (kind 'prompts') and data/tiny_tasks.py ensure_unseen_prompts.
      tiny_prompts="unseen",
      tiny_task_train_records=1000,
      tiny_task_eval_records=1000,
  ))
  config.rl = ml_collections.ConfigDict(dict(
      prompts_per_iteration=32,
      samples_per_prompt=1,    # G: replies per prompt (GRPO / RLOO / online DPO: >= 2)
      max_prompt_len=48,       # prompts are left-padded to this (longer: oldest tokens cut)
      max_new_tokens=32,
      temperature=1.0,         # sampling of the rollouts (1: the policy's own distribution)
      top_k=0,
      top_p=1.0,
      epochs=2,                # passes over each rollout
      minibatches=2,           # optimizer updates per pass
      # DAPO's dynamic sampling (G >= 2): groups whose G scores are all equal are dropped
      # and more prompts sampled, up to this many extra rounds (training/rl/rollout.py).
      dynamic_sampling=False,
      dynamic_sampling_max_rounds=8,
      # Multi-turn episodes with tools (training/rl/episodes.py): '' = one reply per prompt,
      # else a toolset of data/tools.py ('tiny_world': lookup and calc); max_new_tokens then
      # caps each reply, these two the episode.
      tools="",
      max_turns=4,             # model turns per episode at most (tools)
      max_episode_tokens=128,  # tokens after the prompt, model's and tools', at most (tools)
      # Pack each minibatch's episodes (prompt + reply, no padding) into rows with segment
      # ids for the update (training/rl/packing.py); off: every row is P + T wide.
      pack_updates=False,
      # Off-policy, overlapped rollouts (training/rl/offpolicy.py): iteration t + staleness
      # is sampled with iteration t's weights while t updates (0: synchronous), on the first
      # rollout_devices devices (0: on the training mesh), each token's policy loss weighted
      # by min(pi_old / pi_behaviour, max_importance_ratio) (truncated importance sampling).
      staleness=0,
      rollout_devices=0,
      max_importance_ratio=2.0,
      # The sampler's weights: 'compute' (the compute dtype) or 'int8' (weight-only, half
      # the bytes a decode step reads; models/quantize.py), corrected like a stale rollout.
      rollout_weights="compute",
      # The decode steps' products: 'xla' (XLA's GEMMs) or 'pallas' (GPU: models/
      # decode_gemm.py's kernel, streaming each weight once; not tensor-parallel).
      decode_gemm="xla",
  ))
  config.reward = ml_collections.ConfigDict(dict(
      function="tiny_answer",  # training/rl/rewards.py REWARD_FUNCTIONS ('' = none)
      model="",                # reward-model run (training/stages/reward.py); '' = none
      missing_stop_penalty=1.0,  # subtracted when a reply runs out of tokens unstopped
      # DAPO's overlong shaping: a penalty growing 0 -> 1 over the last this-many tokens
      # before rl.max_new_tokens (training/rl/rewards.py); 0 = off.
      overlong_buffer=0,
  ))
  config.value = ml_collections.ConfigDict(dict(
      source="none",           # 'head' | 'model' (PPO) | 'none'
      init_from="",            # source 'model': run to start it from ('' = reward.model,
                               # else init_from: a fresh scalar head on the SFT decoder)
  ))
  config.eval = ml_collections.ConfigDict(dict(
      num_prompts=64,          # distinct held-out prompts (and as many RL-train prompts)
      max_new_tokens=32,
      batch_size=64,
      # Sampled replies per prompt at rl.temperature / top_k / top_p, with fixed keys:
      # eval/sampled_reward, the policy's expected reward (0: greedy figures only).
      samples=4,
  ))
  config.checkpoint.max_to_keep = 2


def set_tiny(config: ml_collections.ConfigDict) -> None:
  """The tiny world's model, prompt sizes and schedule (2 CPU cores, minutes)."""
  config.init_from = "runs/sft_tiny"
  config.model = model_config("tiny")  # must match the SFT run's model
  config.data.tokenizer_vocab_size = config.model.vocab_size
  config.rl.update(dict(prompts_per_iteration=16, samples_per_prompt=4, max_prompt_len=32,
                        max_new_tokens=24))
  # 8 samples of each held-out question (37 in the tiny world): a steadier sampled figure
  # than the default 4, for a few seconds more per evaluation.
  config.eval.update(dict(num_prompts=64, max_new_tokens=32, batch_size=64, samples=8))
  config.train.update(dict(steps=30, eval_every=10, log_every=1))
  config.checkpoint.every_steps = 10
  config.optimizer.update(dict(lr=1e-4, warmup_steps=5, schedule="constant",
                               weight_decay=0.0))


def set_large(config: ml_collections.ConfigDict, arg: str) -> None:
  """Model preset `arg` on your own prompt files in ChatML, sharded over FSDP."""
  config.model = model_config(arg)
  config.data.source = "files"
  config.data.chat_template = "chatml"
  config.rl.update(dict(prompts_per_iteration=512, max_prompt_len=512, max_new_tokens=512,
                        minibatches=8, epochs=1))
  config.eval.update(dict(num_prompts=512, max_new_tokens=512, batch_size=128))
  config.train.update(dict(steps=500, eval_every=25, log_every=1))
  config.checkpoint.every_steps = 25
  config.mesh.fsdp = -1
  config.mesh.data = 1


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "ppo"
  config.objective = ml_collections.ConfigDict(dict(
      name="ppo",
      kl_coef=0.05,            # beta of the per-token KL penalty in the reward
      kl_estimator="k1",       # 'k1' | 'k2' | 'k3' (objectives/ppo.py)
      adaptive_kl=False,       # Ziegler et al. (2019)'s controller towards target_kl
      target_kl=6.0,           # per reply, summed over its tokens
      kl_horizon=10000.0,
      gamma=1.0,
      lam=0.95,
      whiten_advantages=True,
      clip_eps=0.2,
      value_clip=0.2,          # 0: unclipped value loss
      vf_coef=0.1,
      entropy_coef=0.0,
      reference="",            # frozen reference run ('' = init_from)
  ))
  add_rl_sections(config)
  config.value.source = "head"
  if arg == "tiny":
    set_tiny(config)
    # A separate value model (the SFT decoder with a fresh scalar head): with the head on the
    # policy's trunk, the untrained critic's gradients moved the policy too, to 4.2 nats of
    # held-out KL and garbled replies in 30 iterations (1.4 nats with its own trunk, and a
    # higher reward on the RL prompts; docs/results_rl.md).
    config.value.source = "model"
  elif arg == "bench":
    # scripts/benchmark.py ppo: one iteration of 16 prompts x 64 new tokens, one epoch.
    config.model = model_config("bench")
    config.rl.update(dict(prompts_per_iteration=16, max_prompt_len=64, max_new_tokens=64,
                          epochs=1, minibatches=2))
    config.train.steps = 1
  elif arg == "1b":
    set_large(config, arg)
    # As InstructGPT's PPO (Ouyang et al., 2022): a small KL coefficient and rate, the value
    # function started from the reward model.
    config.objective.kl_coef = 0.02
    config.value.source = "model"
    config.optimizer.update(dict(lr=1e-6, warmup_steps=10, schedule="constant",
                                 weight_decay=0.0))
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, bench, 1b")
  return config

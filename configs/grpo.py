"""GRPO, its successors (Dr. GRPO, DAPO, GSPO, CISPO) and RLOO: group baselines, no value model.

On the tiny world, after pretraining and SFT (configs/pretrain.py, configs/sft.py), with the
verifiable `tiny_answer` reward:

  python -m scripts.train --config configs/grpo.py:tiny --workdir runs/grpo_tiny \\
      --config.init_from=runs/sft_tiny
  python -m scripts.train --config configs/grpo.py:tiny,dapo --workdir runs/dapo_tiny \\
      --config.init_from=runs/sft_tiny
  python -m scripts.train --config configs/grpo.py:tiny,rloo --workdir runs/rloo_tiny \\
      --config.init_from=runs/sft_tiny

With tools (multi-turn episodes: the model calls the tiny world's lookup and calculator,
the results are fed back and masked out of the loss; training/rl/episodes.py), from the
tool-use SFT model (configs/sft.py:tiny_tools):

  python -m scripts.train --config configs/grpo.py:tiny_tools --workdir runs/grpo_tools_tiny \\
      --config.init_from=runs/sft_tools_tiny

The preset is `size[,variant]`: size tiny | tiny_tools | bench (scripts/benchmark.py grpo) |
1b; variant grpo (the default) | bnpo | dr_grpo | dapo | gspo | cispo, each
`objective.loss_type` with its paper's settings (`VARIANTS`), or rloo (leave-one-out baselines, GRPO's loss). The
formulas and papers are in objectives/grpo.py; any field can still be overridden. Setting
`--config.objective.loss_type=dapo` alone changes only the loss (token level, as bnpo): the
`dapo` variant also sets clip-higher, no KL, dynamic sampling and overlong shaping.

Objective: loss_type, loss_level ('' = the loss type's aggregation, else 'sequence' | 'token'
| 'constant'), clip_eps_low / clip_eps_high (the ratio's bounds 1 - low, 1 + high; cispo: the
weight's upper bound only), kl_coef (k3 KL to the reference inside the loss, 0 = off),
normalize_std (divide advantages by the group's std; Dr. GRPO: no), std_ddof (0: population
std, 1: sample std), reference ('' = init_from). Rollout: rl.dynamic_sampling and
rl.dynamic_sampling_max_rounds (training/rl/rollout.py), reward.overlong_buffer
(training/rl/rewards.py). Rewards from a Python function (`reward.function`) and / or a
reward-model run (`reward.model`), as configs/ppo.py, whose docstring describes the iteration
counting and the reported metrics.

With `rl.epochs` = `rl.minibatches` = 1 (bench) the one update is on-policy and the rollout
skips the policy's forward pass for log pi_old (training/rl/loop.py).

Off-policy, overlapped rollouts, e.g. one step stale on 4 of 8 devices (training/rl/
offpolicy.py; docs/results_rl.md has the tiny-world comparison):

  python -m scripts.train --config configs/grpo.py:tiny --workdir runs/grpo_k1_tiny \
      --config.init_from=runs/sft_tiny --config.rl.staleness=1 --config.rl.rollout_devices=4

Packed updates: `--config.rl.pack_updates=True` (training/rl/packing.py).
"""

import ml_collections

from configs import base
from configs.models import model_config
from configs.ppo import add_rl_sections, set_large, set_tiny

# Each variant's settings from its paper (objectives/grpo.py), by config section.
VARIANTS = {
    "grpo": {},                                            # Shao et al., 2024
    "rloo": dict(objective=dict(name="rloo")),             # Ahmadian et al., 2024
    "bnpo": dict(objective=dict(loss_type="bnpo")),
    # Liu et al., 2025: no std in the advantages, a constant normaliser.
    "dr_grpo": dict(objective=dict(loss_type="dr_grpo", normalize_std=False)),
    # Yu et al., 2025: clip-higher (0.2 / 0.28), no KL, dynamic sampling; its overlong buffer
    # (4096 of a 20480-token budget: a fifth) is set from the budget in `get_config`.
    "dapo": dict(objective=dict(loss_type="dapo", clip_eps_low=0.2, clip_eps_high=0.28,
                                kl_coef=0.0),
                 rl=dict(dynamic_sampling=True)),
    # Zheng et al., 2025 (sec. 5.1): sequence-ratio clip 3e-4 / 4e-4, no KL.
    "gspo": dict(objective=dict(loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4,
                                kl_coef=0.0)),
    # MiniMax, 2025: no KL; the paper tunes only the weight's upper bound and publishes no
    # value, so clip_eps_high keeps its default.
    "cispo": dict(objective=dict(loss_type="cispo", kl_coef=0.0)),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, _, variant = arg.partition(",")
  variant = variant or "grpo"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} in preset {arg!r}: {', '.join(VARIANTS)}")
  config = base.base_config()
  config.objective = ml_collections.ConfigDict(dict(
      name="grpo",
      loss_type="grpo",        # objectives/grpo.py LOSS_TYPES
      loss_level="",           # '' = the loss type's | 'sequence' | 'token' | 'constant'
      clip_eps_low=0.2,        # ratio clipped to [1 - low, 1 + high]
      clip_eps_high=0.2,       # DAPO's clip-higher: 0.28
      kl_coef=0.04,            # beta of GRPO's k3 KL in the loss (Shao et al., 2024); 0 = off
      normalize_std=True,      # grpo: divide by the group's std (Dr. GRPO: False)
      std_ddof=0,              # the group std: 0 population, 1 sample (Bessel)
      reference="",            # frozen reference run ('' = init_from)
  ))
  add_rl_sections(config)
  if size == "tiny":
    set_tiny(config)
    config.rl.update(dict(prompts_per_iteration=16, samples_per_prompt=8, epochs=1))
    # Lower than the shared 1e-4: there GRPO gained more on its own RL questions but lost on
    # the held-out ones, drifting further from the reference; at 2e-5 held-out stays put
    # while the RL questions still gain (docs/results_rl.md, the presets and ablations).
    config.optimizer.lr = 2e-5
  elif size == "tiny_tools":
    # Multi-turn episodes with the tiny world's lookup and calc tools (training/rl/
    # episodes.py), from the tool-use SFT model (configs/sft.py:tiny_tools). A reply is one
    # turn (a call or the answer); a price question takes three turns and ~120 tokens.
    set_tiny(config)
    config.init_from = "runs/sft_tools_tiny"
    config.rl.update(dict(prompts_per_iteration=16, samples_per_prompt=8, epochs=1,
                          tools="tiny_world", max_new_tokens=40, max_turns=4,
                          max_episode_tokens=160))
    # Greedy held-out figures only: an episode costs a sampler call per turn, and sampled
    # evaluation (8 episodes per question) would take longer than the iterations.
    config.eval.update(dict(max_new_tokens=40, samples=0))
    # Faster than `tiny`'s 2e-5: what RL teaches here (use the results the tools return) is
    # no fact of the RL questions, so it carries over to held-out ones.
    config.optimizer.lr = 5e-5
    config.train.steps = 60  # held-out accuracy still rose after 30 (docs/results_rl.md)
  elif size == "bench":
    # scripts/benchmark.py grpo: one iteration of 4 prompts x 4 samples, prompts of 64
    # tokens, 64 new tokens, one on-policy update with the reference's KL in the loss.
    config.model = model_config("bench")
    config.rl.update(dict(prompts_per_iteration=4, samples_per_prompt=4, max_prompt_len=64,
                          max_new_tokens=64, epochs=1, minibatches=1))
    config.train.steps = 1
  elif size == "1b":
    set_large(config, size)
    config.rl.update(dict(prompts_per_iteration=64, samples_per_prompt=8))
    config.optimizer.update(dict(lr=1e-6, warmup_steps=10, schedule="constant",
                                 weight_decay=0.0))
  else:
    raise ValueError(f"unknown preset size {size!r}: tiny, tiny_tools, bench, 1b")
  for section, fields in VARIANTS[variant].items():
    config[section].update(fields)
  if variant == "dapo":
    config.reward.overlong_buffer = max(1, config.rl.max_new_tokens // 5)
  config.stage = config.objective.name
  return config

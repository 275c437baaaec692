"""Reinforcement learning from rewards: PPO, GRPO, RLOO and online DPO (the RLHF stage).

    loop.py        train_rl(config, workdir): sample -> score -> update iterations, with
                   checkpoints, resume, metrics and held-out evaluation
    rollout.py     sampling (models/sampler.py), scores, log-probs and values of prompts
                   (data/prompts.py)
    rewards.py     scores: the text reward function named in the config (data/verifiers.py)
                   and / or the reward-model scorer, minus the missing-stop penalty
    policy.py      ActorCritic: the decoder policy with an optional value head / critic
    algorithm.py   what differs between algorithms: loss, batch, value, KL controller
    algorithms.py  the table of algorithms by config.objective.name
    stages.py      the algorithms as stages of training/registry.py
    ppo.py, grpo.py, online_dpo.py   the algorithms (losses in objectives/ppo.py, grpo.py,
                   dpo.py)
    evaluation.py  greedy held-out evaluation: score, answer accuracy, KL to the reference
"""

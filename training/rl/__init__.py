"""Reinforcement learning from rewards: PPO, GRPO, RLOO and online DPO (the RLHF stage).

    loop.py        train_rl(config, workdir): sample -> score -> update iterations, with
                   checkpoints, resume, metrics and held-out evaluation
    rollout.py     sampling (models/sampler.py), scores, log-probs and values of prompts
                   (data/prompts.py)
    episodes.py    multi-turn episodes with tools (config.rl.tools): the model's calls run by
                   data/tools.py, results fed back and masked out of the loss
    rewards.py     scores: the text reward function named in the config (data/verifiers.py)
                   and / or the reward-model scorer, minus the missing-stop penalty
    policy.py      ActorCritic: the decoder policy with an optional value head / critic
    algorithm.py   what differs between algorithms: loss, batch, value, KL controller
    algorithms.py  the table of algorithms by config.objective.name
    stages.py      the algorithms as stages of training/registry.py
    ppo.py, grpo.py, online_dpo.py   the algorithms (losses in objectives/ppo.py, grpo.py,
                   dpo.py)
    evaluation.py  greedy held-out evaluation: score, answer accuracy, KL to the reference
    packing.py     packed updates: a minibatch's episodes in rows with segment ids
    offpolicy.py   off-policy rollouts: sampled k iterations stale on devices of their own,
                   overlapped with the updates, truncated importance weights
"""

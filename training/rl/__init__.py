"""Reinforcement learning from rewards: PPO, GRPO, RLOO and online DPO (the RLHF stage).

    loop.py        train_rl(config, workdir): sample -> score -> update iterations, with
                   checkpoints, resume, metrics and held-out evaluation
    rollout.py     prompts, sampling (models/sampler.py), scores, log-probs and values
    rewards.py     reward functions named in the config, and the reward-model scorer
    policy.py      ActorCritic: the decoder policy with an optional value head / critic
    algorithm.py   what differs between algorithms: loss, batch, value, KL controller
    ppo.py, grpo.py, online_dpo.py   the algorithms (losses in objectives/ppo.py, grpo.py,
                   dpo.py)
    evaluation.py  greedy held-out evaluation: score, answer accuracy, KL to the reference
    bench.py       benchmark_ppo: timing of one PPO iteration
"""

RL_OBJECTIVES = ("ppo", "grpo", "rloo", "online_dpo")

"""The stages: one module each, pairing a data pipeline, forward passes and an objective.

    clm.py, mlm.py, sft.py, reward.py, dpo.py, distill.py   (training/rl/ for PPO, GRPO, RLOO,
    online DPO)

The interface they implement is training/stage.py; training/registry.py looks them up by
`config.objective.name`.
"""

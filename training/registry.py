"""The stage registry: `config.objective.name` -> its Stage (training/stage.py).

    clm, mlm, sft, reward, dpo, distill    training/stages/*.py, trained by training/loop.py
    classify, classify_encoder             training/stages/classify.py (task fine-tuning)
    ppo, grpo, rloo, online_dpo            training/rl/stages.py, each with its own loop

Adding a stage is one module exporting `STAGE` and one entry below.
"""

from __future__ import annotations

from training.rl import stages as rl_stages
from training.stage import Stage
from training.stages import classify, clm, distill, dpo, mlm, reward, sft

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    clm.STAGE, mlm.STAGE, distill.STAGE, sft.STAGE, reward.STAGE, dpo.STAGE, classify.STAGE,
    classify.ENCODER_STAGE, *rl_stages.STAGES)}


def get_stage(name: str) -> Stage:
  if name not in STAGES:
    raise ValueError(f"config.objective.name: unknown {name!r}; choose one of {sorted(STAGES)}")
  return STAGES[name]


def get_loss_fn(name: str):
  return get_stage(name).loss_fn

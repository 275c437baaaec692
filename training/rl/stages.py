"""The RL algorithms as entries of the stage registry (training/stages), so every tool that
looks a run's objective up (scripts/train.py, scripts/generate.py's model kind, ...) knows
them. Their `train` is training/rl/loop.py's own loop: they have no packed dataset and no
supervised step loop."""

from __future__ import annotations

from training.rl import RL_OBJECTIVES
from training.stages import Stage


def train(config, workdir: str, **kwargs) -> dict[str, float]:
  from training.rl.loop import train_rl  # the loop pulls in orbax, the sampler, ...
  return train_rl(config, workdir, **kwargs)


def no_dataset(config, *args, **kwargs):
  raise ValueError(f"the {config.objective.name!r} stage samples its own data from prompts "
                   "(training/rl/rollout.py); it has no packed dataset: train it with "
                   "scripts/train.py (training/rl/loop.py train_rl)")


def make_stages() -> list[Stage]:
  from training.rl.algorithm import get_algorithm
  return [Stage(name=name, loss_fn=get_algorithm(name).loss_fn, make_dataset=no_dataset,
                train=train) for name in RL_OBJECTIVES]

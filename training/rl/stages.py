"""The RL algorithms as entries of the stage registry (training/registry.py), so every tool that
looks a run's objective up (scripts/train.py, scripts/evaluate.py, ...) knows them. Their
`train` is training/rl/loop.py's own loop: they have no packed dataset and no supervised step
loop."""

from __future__ import annotations

from training.rl.algorithms import ALGORITHMS
from training.rl.loop import train_rl
from training.stage import Stage


def no_dataset(config, *args, **kwargs):
  raise ValueError(f"the {config.objective.name!r} stage samples its own data from prompts "
                   "(training/rl/rollout.py); it has no packed dataset: train it with "
                   "scripts/train.py (training/rl/loop.py train_rl)")


STAGES = tuple(Stage(name=name, loss_fn=algorithm.loss_fn, make_dataset=no_dataset,
                     train=train_rl) for name, algorithm in ALGORITHMS.items())

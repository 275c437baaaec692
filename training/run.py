"""The one entry every stage is trained through: the supervised loop, or a stage's own loop
(RL stages sample, score and update: `Stage.train`)."""

from __future__ import annotations

import ml_collections

from training.loop import train_and_evaluate
from training.registry import get_stage


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns last metrics."""
  train = get_stage(config.objective.name).train or train_and_evaluate
  return train(config, workdir)

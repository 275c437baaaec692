"""The RL algorithms by `config.objective.name`: ppo | grpo | rloo | online_dpo.

Each algorithm module (ppo.py, grpo.py, online_dpo.py) defines its `Algorithm`
(training/rl/algorithm.py); this table is the one place that lists them.
"""

from __future__ import annotations

from training.rl import grpo, online_dpo, ppo
from training.rl.algorithm import Algorithm

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (ppo.ALGORITHM, grpo.GRPO, grpo.RLOO,
                                                         online_dpo.ALGORITHM)}


def get_algorithm(name: str) -> Algorithm:
  """The algorithm of `config.objective.name`."""
  if name not in ALGORITHMS:
    raise ValueError(f"config.objective.name: {name!r} is not an RL algorithm "
                     f"({' | '.join(ALGORITHMS)})")
  return ALGORITHMS[name]

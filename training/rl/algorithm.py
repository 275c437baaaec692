"""What sets one RL algorithm apart inside the shared iteration loop (training/rl/loop.py).

    rollout (training/rl/rollout.py) --make_batch--> training arrays + figures
            --K epochs x M minibatches of loss_fn through training/step.py--> new params

  loss_fn        a stage loss (training/stage.py LossFn): (model, batch, rng, objective, frozen)
                 -> (per-token values, (sum, weight) metrics); the model is an ActorCritic
  make_batch     (rollout, config, kl_coef) -> (arrays, figures): every array has the
                 algorithm's *units* (reply rows, or preference pairs) as its first dimension
                 and is 2-D, as the train step's batch sharding wants
  value_source   config -> 'none' | 'head' | 'model' (training/rl/policy.py)
  next_kl_coef   (config, kl_coef, figures, episodes) -> the next iteration's KL coefficient
                 (PPO's adaptive controller); None keeps it fixed
  units          'rows' (minibatches of reply rows: the first minibatch's log-probs were
                 computed in the same chunks, so its ratio is exactly 1) or 'pairs'
  reuses_log_probs
                 the loss takes its own log-probs under stop_gradient as log pi_old when the
                 batch has no `old_log_probs`, so an on-policy single update (one epoch, one
                 minibatch) needs no policy pass in the rollout (training/rl/loop.py)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np

from training.stage import LossFn

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Algorithm:
  name: str
  loss_fn: LossFn
  make_batch: Callable[[Any, ml_collections.ConfigDict, float], tuple[Arrays, dict]]
  value_source: Callable[[ml_collections.ConfigDict], str] = lambda config: "none"
  next_kl_coef: Callable[..., float] | None = None
  units: str = "rows"
  reuses_log_probs: bool = False

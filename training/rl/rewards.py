"""Scores of sampled replies: a text reward function named in the config and / or a reward
model, minus a penalty for replies that never stopped.

  config.reward.function   a text reward function of data/verifiers.py (`tiny_answer`,
                           `exact_answer`, or `answer`: the run's config.data.answer_checker):
                           `fn(reply, prompt) -> float` on the decoded reply (stop token
                           removed) and its data.conversation.Prompt ('' = none)
  config.reward.model      workdir (or checkpoint) of a reward-model run (training/stages/
                           reward.py): the score is its scalar head at the sequence's last
                           token, as it was trained ('' = none)
  config.reward.missing_stop_penalty
                           subtracted from the score of a reply that ran out of tokens
                           before its stop token (EOS or the template's end of turn)

  config.reward.overlong_buffer
                           DAPO's overlong reward shaping of the training rollouts (0 = off):
                           with L_max = config.rl.max_new_tokens, the budget, and buffer
                           L_c, a reply of |y| tokens (its stop token included) adds

                             0                           |y| <= L_max - L_c
                             ((L_max - L_c) - |y|) / L_c  L_max - L_c < |y| <= L_max
                             -1                          L_max < |y|

                           a penalty growing linearly over the last L_c tokens before the
                           budget, so a long reply is told it is too long before it is cut
                           (Yu et al., 2025, "DAPO: An Open-Source LLM Reinforcement Learning
                           System at Scale", sec. 3.4; there L_max 20480, L_c 4096). Replies
                           are never longer than the budget here, so the last case is for
                           completeness. Held-out evaluation scores without it, so its
                           figures compare across runs.

With both a function and a model the score is their sum; a reply cut at the budget without a
stop loses both the missing-stop penalty and, with shaping on, 1 more. The text functions and
their lookup (`get_reward_function`) live with the answer checkers in data/verifiers.py; this
module combines the scores (`function_scores`, `stop_penalties`, `overlong_penalties`) and runs
the reward model (`RewardModelScorer`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data.conversation import Prompt
from data.verifiers import RewardFn
from models.build import ModelSpec, Params, build_model_spec
from parallel.rules import use_mesh_rules
from training.runs import init_params, load_model


def function_scores(fn: RewardFn, replies: Sequence[str], prompts: Sequence[Prompt]
                    ) -> np.ndarray:
  """`[n]` float32 scores of `fn` on each (reply, prompt)."""
  return np.asarray([fn(r, p) for r, p in zip(replies, prompts)], np.float32)


def stop_penalties(stopped: np.ndarray, penalty: float) -> np.ndarray:
  """`[n]` float32: -penalty where a reply did not stop, else 0."""
  return np.where(np.asarray(stopped, bool), 0.0, -float(penalty)).astype(np.float32)


def overlong_penalties(lengths: np.ndarray, max_length: int, buffer: int) -> np.ndarray:
  """`[n]` float32 overlong shaping of replies of `lengths` tokens (module docstring).

  Args:
    lengths: `[n]` reply lengths in tokens.
    max_length: L_max, the generation budget.
    buffer: L_c, the tokens before L_max over which the penalty grows from 0 to -1; 0: off.
  """
  lengths = np.asarray(lengths, np.float64)
  if buffer <= 0:
    return np.zeros(lengths.shape, np.float32)
  if buffer > max_length:
    raise ValueError(f"config.reward.overlong_buffer {buffer} exceeds the budget "
                     f"config.rl.max_new_tokens {max_length}")
  start = max_length - buffer
  return np.clip((start - lengths) / buffer, -1.0, 0.0).astype(np.float32)


class RewardModelScorer:
  """A frozen reward model (models/heads.py RewardModel), jitted.

  `__call__(rows)` takes whole-sequence rows (training/rl/rollout.py layout: `tokens`,
  `positions`, `segment_ids` `[batch, length]` and `last` `[batch]`, the index of each row's
  last real token) as global arrays and returns its scores `[batch]`, replicated.
  """

  def __init__(self, spec: ModelSpec, params: Params, mesh, rules):
    self.spec, self.params = spec, params

    def score(params, rows):
      with use_mesh_rules(mesh, rules):
        scores = spec.bind(params)(rows["tokens"], positions=rows["positions"],
                                   segment_ids=rows["segment_ids"])
        return jnp.take_along_axis(scores, rows["last"][:, None], axis=1)[:, 0]

    self._score = jax.jit(score, out_shardings=NamedSharding(mesh, P()))

  @classmethod
  def from_run(cls, path: str, mesh, rules) -> RewardModelScorer:
    """The reward model of the run at `path` (training/runs.py `load_model`), on `mesh`."""
    model = load_model(path, kind="reward", mesh=mesh, rules=rules, with_tokenizer=False)
    return cls(model.spec, model.params, mesh, rules)

  @classmethod
  def random(cls, model_config, mesh, rules, seed: int = 1) -> RewardModelScorer:
    """A randomly initialised reward model (benchmarks: no run exists)."""
    spec = build_model_spec(model_config, "reward")
    return cls(spec, init_params(spec, mesh, rules, seed), mesh, rules)

  def __call__(self, rows: dict[str, jax.Array]) -> jax.Array:
    return self._score(self.params, rows)

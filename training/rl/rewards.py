"""Scores of sampled replies: Python reward functions named in the config, or a reward model.

  config.reward.function   a name in REWARD_FUNCTIONS: `fn(reply, prompt) -> float` on the
                           decoded reply (stop token removed) and its data.conversation.Prompt
                           ('' = none)
  config.reward.model      workdir (or checkpoint) of a reward-model run (training/stages/
                           reward.py): the score is its scalar head at the sequence's last
                           token, as it was trained ('' = none)
  config.reward.missing_stop_penalty
                           subtracted from the score of a reply that ran out of tokens
                           before its stop token (EOS or the template's end of turn)

With both a function and a model the score is their sum. Functions:

  tiny_answer    1 if the reply states the prompt's reference answer as a whole word
                 (data/tiny_tasks.py `answer_correct`), else 0: the tiny world's verifiable
                 reward
  exact_answer   1 if the reply is exactly the reference answer (case, punctuation and
                 spacing aside), else 0: for prompts whose reply should be the bare answer
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data import tiny_tasks
from data.conversation import Prompt
from parallel.rules import tree_shardings, use_mesh_rules

RewardFn = Callable[[str, Prompt], float]

_WORDS = re.compile(r"[^a-z0-9]+")


def tiny_answer(reply: str, prompt: Prompt) -> float:
  if prompt.answer is None:
    raise ValueError("reward 'tiny_answer' needs prompts with an 'answer' field")
  return float(tiny_tasks.answer_correct(reply, prompt.answer))


def exact_answer(reply: str, prompt: Prompt) -> float:
  if prompt.answer is None:
    raise ValueError("reward 'exact_answer' needs prompts with an 'answer' field")
  norm = lambda s: _WORDS.sub(" ", s.lower()).strip()
  return float(norm(reply) == norm(prompt.answer))


REWARD_FUNCTIONS: dict[str, RewardFn] = {"tiny_answer": tiny_answer,
                                         "exact_answer": exact_answer}


def get_reward_function(name: str) -> RewardFn | None:
  """The function called `name` ('' -> None)."""
  if not name:
    return None
  if name not in REWARD_FUNCTIONS:
    raise ValueError(f"config.reward.function: unknown {name!r}; choose one of "
                     f"{sorted(REWARD_FUNCTIONS)}")
  return REWARD_FUNCTIONS[name]


def function_scores(fn: RewardFn, replies: Sequence[str], prompts: Sequence[Prompt]
                    ) -> np.ndarray:
  """`[n]` float32 scores of `fn` on each (reply, prompt)."""
  return np.asarray([fn(r, p) for r, p in zip(replies, prompts)], np.float32)


def stop_penalties(stopped: np.ndarray, penalty: float) -> np.ndarray:
  """`[n]` float32: -penalty where a reply did not stop, else 0."""
  return np.where(np.asarray(stopped, bool), 0.0, -float(penalty)).astype(np.float32)


class RewardModelScorer:
  """A frozen reward model (models/heads.py RewardModel) restored from a run, jitted.

  `__call__(rows)` takes whole-sequence rows (training/rl/rollout.py layout: `tokens`,
  `positions`, `segment_ids` `[batch, length]` and `last` `[batch]`, the index of each row's
  last real token) as global arrays and returns its scores `[batch]`, replicated.
  """

  def __init__(self, path: str, mesh, rules, model_config=None):
    """Restores the reward model at `path`, with the model config of its own run (or
    `model_config`, e.g. for a randomly initialised benchmark model when `path` is '')."""
    from configs.base import run_dir
    from models.build import build_model_spec
    from models.convert.hf_export import load_run_config
    from training.checkpoint import Checkpointer
    if model_config is None:
      model_config = load_run_config(run_dir(path)).model
    self.spec = build_model_spec(model_config, "reward")
    shardings = tree_shardings(self.spec.logical_axes, self.spec.shapes, mesh, rules)
    if path:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.spec.shapes, shardings)
      self.params = Checkpointer.restore_params(path, target)
    else:
      self.params = jax.jit(self.spec.init, out_shardings=shardings)(jax.random.PRNGKey(1))
    spec = self.spec

    def score(params, rows):
      with use_mesh_rules(mesh, rules):
        scores = spec.bind(params)(rows["tokens"], positions=rows["positions"],
                                   segment_ids=rows["segment_ids"])
        return jnp.take_along_axis(scores, rows["last"][:, None], axis=1)[:, 0]

    self._score = jax.jit(score, out_shardings=NamedSharding(mesh, P()))

  def __call__(self, rows: dict[str, jax.Array]) -> jax.Array:
    return self._score(self.params, rows)

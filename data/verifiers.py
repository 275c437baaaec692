"""Verifiable answers: answer checkers, and the text reward functions built on them.

An answer checker `check(reply, answer) -> bool` says whether a reply states a prompt's short
reference answer. The run's checker is `config.data.answer_checker`, resolved once by
`get_answer_checker` and handed to everything that checks answers: SFT's held-out accuracy
(training/stages/sft.py), RL's rollout and evaluation figures and its `answer` reward
(training/rl/). Checkers:

  tiny_world              the reply states the answer as a whole word, case and punctuation
                          aside (data/tiny_tasks.py `answer_correct`): "It costs 42 coins."
                          states "42", "It costs 420 coins." does not
  exact                   the reply is the answer, case, punctuation and spacing aside: for
                          prompts whose reply should be the bare answer
  math                    the reply's final answer (after `####`, in `\\boxed{}`, else its
                          last number) equals the answer's by value: GSM8K / MATH
                          (data/math_answers.py)
  "package.module:function"   your own, imported by name

A text reward function `fn(reply, prompt) -> float` scores a decoded reply (stop token
removed) against its data.conversation.Prompt; `config.reward.function` names one
(`get_reward_function`), and training/rl/rewards.py adds it to the reward model's score:

  tiny_answer    1 if the `tiny_world` checker accepts the reply, else 0: the tiny world's
                 verifiable reward, whatever checker the run configures
  exact_answer   1 if the `exact` checker accepts it, else 0
  answer         1 if the run's configured checker accepts it, else 0
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Callable

from data import math_answers
from data import tiny_tasks
from data.conversation import Prompt

AnswerChecker = Callable[[str, str], bool]
RewardFn = Callable[[str, Prompt], float]

_NON_WORD = re.compile(r"[^a-z0-9]+")


def _words(text: str) -> str:
  """Lower-case words separated by single spaces: `" Monday!! "` -> `"monday"`."""
  return _NON_WORD.sub(" ", text.lower()).strip()


def exact_answer_match(reply: str, answer: str) -> bool:
  """Whether `reply` is exactly `answer`, case, punctuation and spacing aside."""
  return _words(reply) == _words(answer)


ANSWER_CHECKERS: dict[str, AnswerChecker] = {"tiny_world": tiny_tasks.answer_correct,
                                             "exact": exact_answer_match,
                                             "math": math_answers.math_answer_match}


def get_answer_checker(name: str, key: str = "config.data.answer_checker") -> AnswerChecker:
  """The checker `name`: one of ANSWER_CHECKERS, or `"package.module:function"` imported.

  Args:
    name: the configured value.
    key: where the value came from, for the error messages.

  Raises:
    ValueError: `name` is neither a known checker nor a `module:function` path, the module
      cannot be imported, or it has no such callable.
  """
  if name in ANSWER_CHECKERS:
    return ANSWER_CHECKERS[name]
  module_name, _, function_name = name.partition(":")
  if not module_name or not function_name:
    raise ValueError(f"{key}: unknown answer checker {name!r}; choose one of "
                     f"{sorted(ANSWER_CHECKERS)} or give your own as 'package.module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{key}: cannot import module {module_name!r} of answer checker "
                     f"{name!r}: {e}") from e
  checker = getattr(module, function_name, None)
  if not callable(checker):
    found = "nothing" if checker is None else type(checker).__name__
    raise ValueError(f"{key}: {name!r} must name a function check(reply, answer) -> bool; "
                     f"module {module_name!r} has {found} called {function_name!r}")
  return checker


def _answer_of(prompt: Prompt, reward: str) -> str:
  if prompt.answer is None:
    raise ValueError(f"reward {reward!r} needs prompts with an 'answer' field")
  return prompt.answer


def tiny_answer(reply: str, prompt: Prompt) -> float:
  return float(tiny_tasks.answer_correct(reply, _answer_of(prompt, "tiny_answer")))


def exact_answer(reply: str, prompt: Prompt) -> float:
  return float(exact_answer_match(reply, _answer_of(prompt, "exact_answer")))


def answer(reply: str, prompt: Prompt, *, checker: AnswerChecker) -> float:
  """1.0 if `checker` accepts the reply as stating the prompt's answer, else 0.0."""
  return float(bool(checker(reply, _answer_of(prompt, "answer"))))


# The rewards that fix their own check; `answer` is bound to the run's checker on lookup.
REWARD_FUNCTIONS: dict[str, RewardFn] = {"tiny_answer": tiny_answer,
                                         "exact_answer": exact_answer}
REWARD_NAMES = (*REWARD_FUNCTIONS, "answer")


def get_reward_function(name: str, checker: AnswerChecker | None = None) -> RewardFn | None:
  """The reward function called `name` ('' -> None).

  Args:
    name: `config.reward.function`, one of REWARD_NAMES or ''.
    checker: the run's answer checker (`get_answer_checker(config.data.answer_checker)`),
      which the `answer` reward applies; `tiny_answer` and `exact_answer` fix their own.

  Raises:
    ValueError: an unknown name, or `answer` without a checker.
  """
  if not name:
    return None
  if name == "answer":
    if checker is None:
      raise ValueError("config.reward.function 'answer' needs the run's answer checker "
                       "(config.data.answer_checker)")
    return functools.partial(answer, checker=checker)
  if name not in REWARD_FUNCTIONS:
    raise ValueError(f"config.reward.function: unknown {name!r}; choose one of "
                     f"{sorted(REWARD_NAMES)}")
  return REWARD_FUNCTIONS[name]

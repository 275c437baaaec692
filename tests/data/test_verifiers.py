"""data/verifiers.py: the answer checkers, a checker plugged in by name, the text rewards, and
that SFT's held-out accuracy and RL's reward and answer accuracy use the configured checker."""

import json

import numpy as np
import pytest

from configs import ppo as ppo_config
from configs import sft as sft_config
from data import chat_template, tiny_tasks, verifiers
from data.conversation import Prompt, Turn
from models.build import build_model_spec
from models.sampler import SampleOutput
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.rl.rollout import Rollout, RolloutEngine, rollout_metrics
from training.stage import EvalContext
from training.stages import sft as sft_stage

# Plugged in below as "tests.data.test_verifiers:starts_with_answer".
PLUGIN = f"{__name__}:starts_with_answer"
NOT_CALLABLE = 42


def starts_with_answer(reply: str, answer: str) -> bool:
  """A stand-in user checker: the reply's first word is the answer (case and punctuation
  aside). "Elmstead, of course." states "Elmstead"; "It is 42." does not state "42"."""
  words = reply.split()
  return bool(words) and words[0].strip(".,!?").lower() == answer.lower()


def _question(text: str) -> tuple[Turn, ...]:
  return (Turn("user", text),)


@pytest.mark.parametrize("reply, answer, expected", [
    ("It costs 42 coins.", "42", True),
    ("42", "42", True),
    ("It costs 420 coins.", "42", False),      # a number containing the answer
    ("It costs 142 coins.", "42", False),
    ("The market is on monday!", "Monday", True),
    ("Mondays are market days.", "Monday", False),  # a longer word starting with it
    ("Rosa lives in Elmstead.", "Elmstead", True),
    ("Rosa lives in Elmsteads.", "Elmstead", False),
    ("It comes from Old-Mill.", "old mill", True),  # punctuation and case aside
    ("It comes from Old.", "old mill", False),
    ("", "Monday", False),
])
def test_tiny_world_checker_matches_whole_words(reply, answer, expected):
  check = verifiers.get_answer_checker("tiny_world")
  assert check is tiny_tasks.answer_correct
  assert check(reply, answer) is expected


@pytest.mark.parametrize("reply, answer, expected", [
    ("Monday", "Monday", True),
    ("  monday! ", "Monday", True),            # case, punctuation and spacing aside
    ("New-Haven", "new haven", True),
    ("It is Monday.", "Monday", False),        # stating it is not enough
    ("Mondays", "Monday", False),
    ("", "Monday", False),
])
def test_exact_checker_is_the_bare_answer(reply, answer, expected):
  assert verifiers.get_answer_checker("exact")(reply, answer) is expected


def test_a_checker_plugs_in_by_module_and_function_name():
  check = verifiers.get_answer_checker(PLUGIN)
  assert check is starts_with_answer
  assert check("Elmstead, of course.", "Elmstead") and not check("It is 42.", "42")


@pytest.mark.parametrize("name, message", [
    ("fuzzy", "config.data.answer_checker: unknown answer checker 'fuzzy'; choose one of "
              "['exact', 'math', 'tiny_world'] or give your own as 'package.module:function'"),
    ("tests.data.test_verifiers:", "unknown answer checker"),
    ("no_such_package.checks:check",
     "config.data.answer_checker: cannot import module 'no_such_package.checks' of answer "
     "checker 'no_such_package.checks:check'"),
    (f"{__name__}:no_such_function", f"module {__name__!r} has nothing called "
                                      "'no_such_function'"),
    (f"{__name__}:NOT_CALLABLE", f"module {__name__!r} has int called 'NOT_CALLABLE'"),
])
def test_checker_errors_name_the_config_key(name, message):
  with pytest.raises(ValueError) as e:
    verifiers.get_answer_checker(name)
  assert message in str(e.value)
  assert str(e.value).startswith("config.data.answer_checker: ")


def test_reward_functions():
  prompt = Prompt(_question("How much do 6 sacks of salt cost?"), "42")
  tiny, exact = (verifiers.get_reward_function(n) for n in ("tiny_answer", "exact_answer"))
  assert [tiny(r, prompt) for r in ("They cost 42 coins.", "420", "42!")] == [1.0, 0.0, 1.0]
  assert [exact(r, prompt) for r in ("They cost 42 coins.", "420", "42!")] == [0.0, 0.0, 1.0]
  # `answer` applies the checker it is given; the other two keep their own.
  answer = verifiers.get_reward_function("answer", starts_with_answer)
  assert [answer(r, prompt) for r in ("They cost 42 coins.", "42 coins.")] == [0.0, 1.0]
  assert verifiers.get_reward_function("tiny_answer", starts_with_answer) is tiny
  assert verifiers.get_reward_function("") is None
  with pytest.raises(ValueError, match="needs the run's answer checker"):
    verifiers.get_reward_function("answer")
  with pytest.raises(ValueError, match=r"unknown 'fuzzy'; choose one of \['answer', "):
    verifiers.get_reward_function("fuzzy")
  with pytest.raises(ValueError, match="reward 'answer' needs prompts with an 'answer'"):
    answer("42", Prompt(_question("Hi?")))


def _replies_and_prompts():
  """Four replies: the tiny world's check accepts three, `starts_with_answer` two."""
  replies = ["Elmstead, of course.", "It is 42.", "42 coins.", "Coldharbour."]
  answers = ["Elmstead", "42", "42", "Elmstead"]
  return replies, answers


def test_sft_accuracy_uses_the_configured_checker():
  config = sft_config.get_config("tiny")
  assert config.data.answer_checker == "tiny_world"
  replies, answers = _replies_and_prompts()
  items = [sft_stage.HeldOut(_question("Q?"), a) for a in answers]
  items.append(sft_stage.HeldOut(_question("Who is Ada?"), None, "A grower."))
  replies.append("A grower.")
  stopped = [True, True, False, True, True]

  def score(checker_name):
    config.data.answer_checker = checker_name
    check = verifiers.get_answer_checker(config.data.answer_checker)
    return sft_stage.score_replies(replies, stopped, items, check)

  assert score("tiny_world") == {"eval/answer_accuracy": 3 / 4, "eval/exact_match": 1.0,
                                 "eval/stop_rate": 4 / 5}
  assert score(PLUGIN) == {"eval/answer_accuracy": 2 / 4, "eval/exact_match": 1.0,
                           "eval/stop_rate": 4 / 5}


def test_sft_evaluator_resolves_the_checker_from_the_config(tiny_tokenizer, tmp_path):
  """The stage's evaluator, with a stand-in sampler replying the four replies above."""
  replies, answers = _replies_and_prompts()
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "answer": a}) + "\n"
                          for i, a in enumerate(answers)))
  config = sft_config.get_config("tiny")
  config.eval.update(dict(prompt_files=str(path), num_prompts=4, batch_size=4,
                          max_new_tokens=16))
  config.data.answer_checker = PLUGIN
  tok = tiny_tokenizer
  end_of_turn = chat_template.stop_ids(tok, config.data.chat_template)[0]

  def generate(params, prompts, *, max_new_tokens, eos_id, pad_id, stop_ids, temperature):
    del params, eos_id, stop_ids, temperature
    rows = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i, reply in enumerate(replies[:len(prompts)]):
      ids = tok.encode(reply) + [end_of_turn]
      rows[i, :len(ids)], lengths[i] = ids, len(ids)
    return SampleOutput(rows, np.zeros(rows.shape, np.float32),
                        (rows != pad_id).astype(np.float32), lengths)

  evaluator = sft_stage.GenerationEvaluator(EvalContext(config, tok, None, None, None, ""),
                                            generate=generate)
  assert evaluator.answer_check is starts_with_answer
  assert evaluator(None) == {"eval/answer_accuracy": 2 / 4, "eval/stop_rate": 1.0}


def test_rl_reward_and_answer_accuracy_use_the_configured_checker(tiny_tokenizer):
  config = ppo_config.get_config("tiny")
  config.model.update(dict(vocab_size=384, d_model=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, mlp_dim=64))
  config.data.answer_checker = PLUGIN
  config.reward.function = "answer"
  check = verifiers.get_answer_checker(config.data.answer_checker)
  reward_fn = verifiers.get_reward_function(config.reward.function, check)
  spec = build_model_spec(config.model)
  engine = RolloutEngine(config, spec, tiny_tokenizer, make_mesh(config.mesh),
                         get_rules(config.mesh.rules), ref_spec=spec, ref_params=None,
                         reward_fn=reward_fn, reward_model=None, answer_check=check)
  assert engine.answer_check is starts_with_answer
  replies, answers = _replies_and_prompts()
  prompts = [Prompt(_question("Q?"), a) for a in answers] + [Prompt(_question("Hi?"))]
  replies.append("Hello.")
  # Rewards 1, 0, 1, 0 by the plugged-in checker, minus the missing-stop penalty (1.0) of the
  # third reply; no reward model, so no rows are read.
  stopped = np.array([True, True, False, True])
  np.testing.assert_array_equal(
      engine.score(None, replies[:4], stopped, prompts[:4]), [1.0, 0.0, 0.0, 0.0])
  correct = engine.check_answers(replies, prompts)
  assert correct == [True, False, True, False]  # the prompt without an answer is skipped
  rollout = Rollout(prompts=prompts[:4], rows={}, mask=np.ones((4, 2), np.float32),
                    replies=replies[:4], stopped=stopped, scores=np.zeros(4, np.float32),
                    log_probs=np.zeros((4, 2)), ref_log_probs=np.zeros((4, 2)), values=None,
                    answers_correct=correct)
  assert rollout_metrics(rollout)["answer_accuracy"] == 0.5

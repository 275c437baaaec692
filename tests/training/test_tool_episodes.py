"""Multi-turn tool episodes (training/rl/episodes.py): a scripted policy gives exact tokens and
loss masks (environment tokens masked out), the turn and token caps end episodes, malformed
calls are answered, and a GRPO iteration with tools runs end to end."""

import types

import jax
import numpy as np
import pytest

from configs import grpo as grpo_config
from data import tiny_world
from data.chat_template import (render, render_completion, render_prompt, stop_ids,
                                tool_result_tokens)
from data.conversation import Prompt, Turn
from data.tokenizer import Tokenizer, train_sentencepiece
from data.tools import ToolEnvironment, tiny_world_tools
from models.build import build_model_spec
from scripts.chat import ChatSession
from training.checkpoint import Checkpointer
from training.metrics import read_metrics
from training.rl.episodes import run_episodes
from training.rl.loop import train_rl
from training.rl.rollout import build_rows
from training.validate import validate_config

VOCAB = 384
QUESTION = "How much do 9 sacks of salt cost?"
CALL_1, RESULT_1 = "<tool>lookup: salt, price</tool>", "A sack of salt costs 4 coins."
CALL_2, RESULT_2 = "<tool>calc: 9 * 4</tool>", "9 * 4 = 36"
ANSWER = "9 sacks of salt cost 36 coins."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "spm"
  return Tokenizer.load(train_sentencepiece(tiny_world.generate_documents("train", 1500),
                                            str(prefix), VOCAB))


class Scripted:
  """A fake policy: row i's turn k is `script[i][k]` (text; a stop token is appended unless
  the entry is `(text, False)`); it records the contexts it was given."""

  def __init__(self, tok, script, template="default"):
    self.tok, self.script, self.contexts = tok, script, []
    self.eot = stop_ids(tok, template)[0]

  def __call__(self, contexts, turn):
    self.contexts.append([list(c) for c in contexts])
    out = []
    for row in self.script:
      entry = row[min(turn, len(row) - 1)]
      text, stop = entry if isinstance(entry, tuple) else (entry, True)
      out.append(self.tok.encode(text) + ([self.eot] if stop else []))
    return out


def _run(tok, script, *, max_turns=4, max_tokens=200, template="default"):
  prompt = Prompt((Turn("user", QUESTION),), "36")
  prompt_tokens = render_prompt(tok, prompt.context, template)
  policy = Scripted(tok, script, template)
  episodes = run_episodes(policy, [prompt_tokens] * len(script), [prompt] * len(script),
                          [ToolEnvironment(tiny_world_tools()) for _ in script],
                          tokenizer=tok, template=template, stop_ids=stop_ids(tok, template),
                          max_prompt_len=48, max_turns=max_turns, max_tokens=max_tokens)
  return episodes, policy, prompt_tokens


def test_scripted_episode_exact_tokens_and_mask(tok):
  episodes, policy, prompt_tokens = _run(tok, [[CALL_1, CALL_2, ANSWER]])
  eot = tok.token_to_id("<|end_of_turn|>")
  model = [tok.encode(CALL_1) + [eot], tok.encode(CALL_2) + [eot], tok.encode(ANSWER) + [eot]]
  env = [tool_result_tokens(tok, RESULT_1), tool_result_tokens(tok, RESULT_2)]
  expected = model[0] + env[0] + model[1] + env[1] + model[2]
  mask = ([1] * len(model[0]) + [0] * len(env[0]) + [1] * len(model[1]) + [0] * len(env[1])
          + [1] * len(model[2]))
  n = len(expected)
  np.testing.assert_array_equal(episodes.tokens[0, :n], expected)
  np.testing.assert_array_equal(episodes.tokens[0, n:], 0)
  np.testing.assert_array_equal(episodes.loss_mask[0, :n], mask)
  np.testing.assert_array_equal(episodes.loss_mask[0, n:], 0)
  np.testing.assert_array_equal(episodes.present[0], [1] * n + [0] * (200 - n))
  # The environment's tokens hold the tools' real results.
  assert f"<result>{RESULT_1}</result>" in tok.decode(env[0])
  # The same as the chat template's rendering of the whole conversation (SFT's layout).
  whole = render(tok, (Turn("user", QUESTION), Turn("assistant", CALL_1), Turn("tool", RESULT_1),
                       Turn("assistant", CALL_2), Turn("tool", RESULT_2),
                       Turn("assistant", ANSWER)), "default")
  np.testing.assert_array_equal(whole.tokens[len(prompt_tokens):], expected)
  np.testing.assert_array_equal(whole.loss_mask[len(prompt_tokens):], mask)
  # Each turn the policy saw the prompt and the whole episode so far, results included.
  assert [c[0] for c in policy.contexts] == [
      prompt_tokens, prompt_tokens + model[0] + env[0],
      prompt_tokens + model[0] + env[0] + model[1] + env[1]]
  assert episodes.replies == [ANSWER] and episodes.stopped.tolist() == [True]
  assert episodes.turns.tolist() == [3] and episodes.calls.tolist() == [2]
  np.testing.assert_array_equal(episodes.prompt_tokens[0, -len(prompt_tokens):], prompt_tokens)
  assert episodes.prompt_lengths.tolist() == [len(prompt_tokens)]


def test_rows_of_an_episode_cover_the_environment_tokens(tok):
  episodes, _, prompt_tokens = _run(tok, [[CALL_1, ANSWER], [ANSWER]])
  rows = build_rows(episodes.prompt_tokens, episodes.prompt_lengths, episodes.tokens,
                    episodes.present)
  p, n = len(prompt_tokens), int(episodes.present[0].sum())
  # Positions run on through the results (segment 1): the answer attends to them.
  np.testing.assert_array_equal(rows["positions"][0, 48 - p:48 + n], np.arange(p + n))
  np.testing.assert_array_equal(rows["segment_ids"][0, 48 - p:48 + n], 1)
  assert rows["segment_ids"][0, 48 + n:].sum() == 0
  assert rows["last"].tolist() == [48 + n - 1, 48 + int(episodes.present[1].sum()) - 1]
  assert episodes.calls.tolist() == [1, 0] and episodes.turns.tolist() == [2, 1]


def test_turn_cap_cuts_an_episode_that_keeps_calling(tok):
  episodes, policy, _ = _run(tok, [[CALL_1]], max_turns=2)
  eot = tok.token_to_id("<|end_of_turn|>")
  call = tok.encode(CALL_1) + [eot]
  n = int(episodes.present[0].sum())
  # Two calls, one answered; the last call is not followed by a result nor by another turn.
  assert n == 2 * len(call) + len(tool_result_tokens(tok, RESULT_1))
  np.testing.assert_array_equal(episodes.tokens[0, n - len(call):n], call)
  assert episodes.loss_mask[0].sum() == 2 * len(call)
  assert len(policy.contexts) == 2
  assert episodes.turns.tolist() == [2] and episodes.calls.tolist() == [1]
  assert episodes.replies == [""] and episodes.stopped.tolist() == [False]


def test_token_cap_cuts_replies_and_results(tok):
  call = len(tok.encode(CALL_1)) + 1
  result = len(tool_result_tokens(tok, RESULT_1))
  # The answer runs past the budget: cut to it, no answer.
  budget = call + result + 3
  episodes, _, _ = _run(tok, [[CALL_1, ANSWER]], max_tokens=budget)
  assert episodes.present[0].sum() == budget and episodes.loss_mask[0].sum() == call + 3
  assert episodes.replies == [""] and not episodes.stopped[0]
  # The result would fill the budget (no token left to answer): the episode ends at the call.
  episodes, policy, _ = _run(tok, [[CALL_1, ANSWER]], max_tokens=call + result)
  assert episodes.present[0].sum() == call and episodes.calls.tolist() == [0]
  assert len(policy.contexts) == 1 and not episodes.stopped[0]


def test_unstopped_turn_and_malformed_call(tok):
  # A reply that ran out of tokens without its stop token ends the episode unanswered.
  episodes, _, _ = _run(tok, [[(ANSWER, False)]])
  assert episodes.replies == [""] and not episodes.stopped[0]
  assert episodes.loss_mask[0].sum() == len(tok.encode(ANSWER))
  # A malformed call is answered with an error and the episode goes on.
  episodes, policy, _ = _run(tok, [["<tool>lookup: salt", CALL_1, ANSWER]])
  second = tok.decode(policy.contexts[1][0])
  assert "<result>error: <tool> is never closed by </tool></result>" in second
  assert episodes.calls.tolist() == [2] and episodes.replies == [ANSWER]


def test_chatml_episode_matches_its_rendering(tok):
  episodes, _, prompt_tokens = _run(tok, [[CALL_1, ANSWER]], template="chatml")
  whole = render(tok, (Turn("user", QUESTION), Turn("assistant", CALL_1),
                       Turn("tool", RESULT_1), Turn("assistant", ANSWER)), "chatml")
  # The episode ends at the model's <|im_end|>; the rendering adds the separator after it.
  body = whole.tokens[len(prompt_tokens):-len(tok.encode("\n"))]
  n = int(episodes.present[0].sum())
  np.testing.assert_array_equal(episodes.tokens[0, :n], body)
  np.testing.assert_array_equal(episodes.loss_mask[0, :n],
                                whole.loss_mask[len(prompt_tokens):len(prompt_tokens) + n])
  assert render_completion(tok, ANSWER, "chatml") == body[-len(tok.encode(ANSWER)) - 1:].tolist()


def test_bad_arguments(tok):
  with pytest.raises(ValueError, match="max_turns >= 1"):
    _run(tok, [[ANSWER]], max_turns=0)
  with pytest.raises(ValueError, match="one each per row"):
    run_episodes(lambda c, t: [], [[1]], [], [], tokenizer=tok, template="default",
                 stop_ids=[3], max_prompt_len=4, max_turns=1, max_tokens=4)


def test_grpo_iteration_with_tools(tok, tmp_path):
  """One GRPO iteration with tools on a small random model: episodes sampled by the real
  sampler, scored, evaluated, and the update's figures finite."""
  base = tmp_path / "sft"
  (base / "tokenizer").mkdir(parents=True)
  train_sentencepiece(tiny_world.generate_documents("train", 1500),
                      str(base / "tokenizer" / "spm"), VOCAB)
  config = grpo_config.get_config("tiny_tools")
  config.init_from = str(base)
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                           vocab_size=VOCAB))
  config.data.update(dict(tiny_task_train_records=64, tiny_task_eval_records=32,
                          tokenizer_vocab_size=VOCAB))
  config.rl.update(dict(prompts_per_iteration=4, samples_per_prompt=4, max_new_tokens=8,
                        max_turns=2, max_episode_tokens=24))
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  config.train.update(dict(steps=1, eval_every=1, log_every=1))
  config.checkpoint.update(dict(every_steps=1, async_save=False))
  config.eval.update(dict(num_prompts=8, max_new_tokens=8, batch_size=8, samples=0))
  spec = build_model_spec(config.model)
  with Checkpointer(str(base / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(1, {"params": spec.init(jax.random.PRNGKey(1))}, force=True)
  train_rl(config, str(tmp_path / "grpo"))
  records = read_metrics(str(tmp_path / "grpo"))
  last = [r for r in records if "train/score" in r][-1]
  assert all(np.isfinite(v) for v in last.values())
  assert last["train/ratio_first_minibatch"] == 1.0
  # A model token count per reply within the budget (environment tokens are not counted).
  assert 0 < last["train/response_length"] <= 24
  assert "eval/answer_accuracy" in records[0]


def test_chat_session_runs_the_calls(tok):
  """scripts.chat --tools: calls are run and their results appended as tool turns; the turn
  cap leaves the last reply unrun."""
  model = types.SimpleNamespace(tokenizer=tok, spec=None, mesh=None, rules=None)
  session = ChatSession(model, template="default", tools="tiny_world", max_turns=3)
  script = iter([CALL_1, CALL_2, ANSWER])

  def scripted():
    text = next(script)
    session.turns.append(Turn("assistant", text))
    return text
  session._generate = scripted
  assert session.reply(QUESTION) == ANSWER
  assert session.steps == [(CALL_1, RESULT_1), (CALL_2, RESULT_2)]
  assert [t.role for t in session.turns] == ["user", "assistant", "tool", "assistant", "tool",
                                            "assistant"]
  script = iter([CALL_1, CALL_1, CALL_2])
  session.reset()
  assert session.reply(QUESTION) == CALL_2  # the third reply is the last allowed: not run
  assert session.steps == [(CALL_1, RESULT_1)] * 2
  with pytest.raises(ValueError, match="--tools: unknown toolset"):
    ChatSession(model, template="default", tools="web")


def test_tool_config_validation():
  config = grpo_config.get_config("tiny_tools")
  assert validate_config(config, 1) == []
  config.rl.update(dict(tools="web", max_turns=0, max_episode_tokens=0))
  config.reward.overlong_buffer = 4
  problems = validate_config(config, 1)
  assert any("config.rl.tools: unknown toolset 'web'" in p for p in problems)
  assert "config.rl.max_turns must be >= 1, got 0" in problems
  assert "config.rl.max_episode_tokens must be >= 1, got 0" in problems
  assert any("overlong_buffer" in p for p in problems)
  config = grpo_config.get_config("tiny_tools")
  config.model.position = "learned"
  assert not any("max_length" in p for p in validate_config(config, 1))
  config.rl.max_episode_tokens = 200  # 32 + 200 + 40 - 1 > 256
  assert any("max_episode_tokens + the longest reply - 1 = 271 exceeds" in p
             for p in validate_config(config, 1))

"""Tools: the calculator and the tiny world's lookup (hand-checked values), the call syntax of
the chat templates (parser, malformed calls, rendering round trip), the environment, the
tool-turn records and the tool-use demonstrations."""

import numpy as np
import pytest

from configs import sft
from data import conversation, sources, tiny_tasks, tool_tasks
from data.chat_template import (ToolCall, ToolCallError, format_tool_call, parse_tool_call,
                                render, render_completion, render_prompt, tool_result_tokens)
from data.conversation import Prompt, Turn
from data.records import InvalidRecord
from data.tools import (Lookup, ToolEnvironment, ToolError, calculate, get_toolset,
                        tiny_world_tools)
from data.world import build_world


# --- calc -------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, value", [
    ("9 * 4", "36"), ("9 x 4", "36"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"),
    ("7 / 2", "3.5"), ("1 / 3", "0.333333"), ("10 - 4 - 3", "3"), ("12 / 4 / 3", "1"),
    ("-3 + 5", "2"), ("-(2 + 3) * -2", "10"), ("2.5 * 4", "10"), ("0.1 + 0.2", "0.3"),
    ("  48 + 16  ", "64"), ("(((7)))", "7"), ("100 / 8", "12.5")])
def test_calculate_values(expression, value):
  assert calculate(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("", "needs an expression"), ("1 / 0", "division by zero"), ("4 / (2 - 2)", "division"),
    ("2 +", "ends too early"), ("(2 + 3", "not closed"), ("2 3", "unexpected '3'"),
    ("__import__('os')", "unexpected"), ("2 ** 3", "unexpected '*'"), ("a + 1", "unexpected"),
    ("9" * 16, "beyond"), ("99999999 * 99999999", "beyond"), ("1 +" * 100 + "1", "more than"),
    ("-" * 40 + "1", "nested")])
def test_calculate_errors(expression, message):
  with pytest.raises(ToolError, match=message):
    calculate(expression)


# --- lookup -----------------------------------------------------------------------------------

def test_lookup_hand_checked_facts():
  lookup = Lookup(build_world())
  # Prices are fixed in data/world.py; the rest was read off build_world() by hand.
  assert lookup("salt, price") == "A sack of salt costs 4 coins."
  assert lookup("copper, price") == "A bar of copper costs 9 coins."
  assert lookup("salt, maker") == "Salt comes from Brackwater."
  assert lookup("Ashford, mayor") == "The mayor of Ashford is Bran."
  assert lookup("ashford, Market Day") == "The market of Ashford is on Monday."
  assert lookup("Ashford, export") == "Ashford makes apples."
  assert lookup("Ashford, Coldharbour") == "It is 16 miles from Ashford to Coldharbour."
  assert lookup("Ashford, Oakhurst") == "No road joins Ashford and Oakhurst."
  assert lookup("Cole, town") == "Cole lives in Elmstead."
  assert lookup("Cole, makes") == "Cole makes linen."
  assert lookup("Cole") == ("Cole lives in Elmstead. Cole is a weaver. Cole makes linen. "
                            "Cole is 60 years old. Cole has no sibling.")
  assert lookup("Ashford").startswith("Ashford is in the forest. Ashford makes apples.")


def test_lookup_agrees_with_the_world():
  w, lookup = build_world(), Lookup(build_world())
  for t in w.towns:
    assert lookup(f"{t.name}, mayor") == f"The mayor of {t.name} is {t.mayor}."
    for other, miles in w.neighbours(t.name):
      assert lookup(f"{t.name}, {other}") == f"It is {miles} miles from {t.name} to {other}."
  for p in w.people:
    assert lookup(f"{p.name}, town") == f"{p.name} lives in {p.town}."


@pytest.mark.parametrize("arguments, message", [
    ("", "takes a name"), ("salt, price, extra", "takes a name"), ("salt,", "takes a name"),
    ("Atlantis", "no town, good or person"), ("salt, mayor", "a good has no field 'mayor'"),
    ("Ashford, colour", "or another town")])
def test_lookup_errors(arguments, message):
  with pytest.raises(ToolError, match=message):
    Lookup(build_world())(arguments)


def test_unknown_toolset():
  with pytest.raises(ValueError, match="unknown toolset 'web'"):
    get_toolset("web")
  assert sorted(get_toolset("tiny_world")) == ["calc", "lookup"]


# --- call syntax --------------------------------------------------------------------------------

def test_parse_tool_call():
  assert parse_tool_call("<tool>lookup: salt, price</tool>") == ToolCall("lookup", "salt, price")
  assert parse_tool_call("Let me see. <tool> calc:(2 + 3) * 4 </tool>") == ToolCall(
      "calc", "(2 + 3) * 4")
  assert format_tool_call("calc", "9 * 4") == "<tool>calc: 9 * 4</tool>"
  assert parse_tool_call("<tool>calc: </tool>") == ToolCall("calc", "")
  assert parse_tool_call("9 sacks of salt cost 36 coins.") is None
  assert parse_tool_call(format_tool_call("lookup", "Cole, town")) == ToolCall("lookup",
                                                                               "Cole, town")


@pytest.mark.parametrize("reply, message", [
    ("<tool>lookup: salt", "never closed"), ("lookup: salt</tool>", "without"),
    ("<tool>lookup salt</tool>", "expected name"), ("<tool></tool>", "expected name"),
    ("<tool>9: x</tool>", "expected name"), ("<tool>lookup(salt)</tool>", "expected name"),
    ("<tool>: salt</tool>", "expected name")])
def test_malformed_calls(reply, message):
  with pytest.raises(ToolCallError, match=message):
    parse_tool_call(reply)


def test_environment_steps():
  prompt = Prompt((Turn("user", "How much do 9 sacks of salt cost?"),), "36")
  env = ToolEnvironment(tiny_world_tools(),
                        reward_fn=lambda reply, p: float(p.answer in reply))
  assert env.reset(prompt) == prompt.context
  first = env.step("<tool>lookup: salt, price</tool>")
  assert (first.observation, first.reward, first.done) == ("A sack of salt costs 4 coins.", 0.0,
                                                           False)
  assert env.step("<tool>calc: 9 * 4</tool>").observation == "9 * 4 = 36"
  assert env.step("<tool>calc:  7 /2 </tool>").observation == "7 /2 = 3.5"
  # Malformed calls, unknown tools and bad arguments are observations, not crashes.
  assert env.step("<tool>calc: 9 * 4").observation.startswith("error: <tool> is never closed")
  assert env.step("<tool>lookup(salt)</tool>").observation.startswith(
      "error: expected name: arguments")
  assert env.step("<tool>calc: </tool>").observation == (
      "error: calc needs an expression, e.g. calc: 9 * 4")
  assert env.step("<tool>search: salt</tool>").observation == (
      "error: no tool 'search'; tools: calc, lookup")
  assert env.step("<tool>calc: 9 / 0</tool>").observation == "error: division by zero"
  assert not env.step("<tool>lookup: Atlantis</tool>").done
  last = env.step("9 sacks of salt cost 36 coins.")
  assert (last.observation, last.reward, last.done) == (None, 1.0, True)
  with pytest.raises(RuntimeError, match="before reset"):
    ToolEnvironment({}).step("hi")


# --- templates ----------------------------------------------------------------------------------

TOOL_CONV = (Turn("user", "How much do 9 sacks of salt cost?"),
             Turn("assistant", "<tool>lookup: salt, price</tool>"),
             Turn("tool", "A sack of salt costs 4 coins."),
             Turn("assistant", "<tool>calc: 9 * 4</tool>"), Turn("tool", "36"),
             Turn("assistant", "9 sacks of salt cost 36 coins."))


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_tool_conversation_round_trip(tiny_tokenizer, template):
  """The whole conversation renders to the prompt, the replies and the tokens the
  environment appends, concatenated; only the replies are supervised."""
  tok = tiny_tokenizer
  whole = render(tok, TOOL_CONV, template)
  pieces = [(render_prompt(tok, TOOL_CONV[:1], template), 0.0)]
  for turn in TOOL_CONV[1:]:
    if turn.role == "assistant":
      pieces.append((render_completion(tok, turn.content, template), 1.0))
    else:
      pieces.append((tool_result_tokens(tok, turn.content, template), 0.0))
  separator = tok.encode("\n") if template == "chatml" else []
  pieces.append((separator, 0.0))
  tokens = [t for piece, _ in pieces for t in piece]
  mask = [m for piece, m in pieces for _ in piece]
  np.testing.assert_array_equal(whole.tokens, tokens)
  np.testing.assert_array_equal(whole.loss_mask, mask)
  text = tok.decode(whole.tokens.tolist())
  assert "<result>A sack of salt costs 4 coins.</result>" in text
  assert "<tool>calc: 9 * 4</tool>" in text


def test_tool_turn_headers(tiny_tokenizer):
  tok = tiny_tokenizer
  default = tool_result_tokens(tok, "36", "default")
  assert default == ([tok.token_to_id("<|system|>")] + tok.encode("<result>36</result>")
                     + [tok.token_to_id("<|end_of_turn|>"), tok.token_to_id("<|assistant|>")])
  chatml = tool_result_tokens(tok, "36", "chatml")
  start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
  assert chatml == (tok.encode("\n") + [start] + tok.encode("tool\n")
                    + tok.encode("<result>36</result>") + [end] + tok.encode("\n") + [start]
                    + tok.encode("assistant\n"))


# --- records and demonstrations -------------------------------------------------------------------

def test_sharegpt_tool_turns_parse():
  record = {"conversations": [{"from": t.role, "value": t.content} for t in TOOL_CONV]}
  assert conversation.parse_sft(record) == TOOL_CONV
  for bad in ([{"from": "user", "value": "q"}, {"from": "tool", "value": "r"}],
              [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"},
               {"from": "tool", "value": "r"}, {"from": "user", "value": "q"}]):
    with pytest.raises(InvalidRecord, match="bad_order|expected"):
      conversation.parse_sft({"conversations": bad})


def test_demonstrations_answer_every_question_kind():
  tools = tiny_world_tools()
  questions = tiny_tasks.questions("train", 300) + tiny_tasks.questions("validation", 300)
  plans = {tuple(name for name, _ in tool_tasks.tool_plan(q.text)) for q in questions}
  assert plans == {("lookup",), ("lookup", "calc")}
  for q in questions:
    turns = tool_tasks.demonstration(q, tools)
    assert turns[0] == {"from": "user", "value": q.text}
    assert turns[-1] == {"from": "assistant", "value": q.response}
    results = " ".join(t["value"] for t in turns if t["from"] == "tool")
    # The tools' results hold the answer: the model only has to copy it.
    assert tiny_tasks.answer_correct(results, q.answer), (q, turns)
  with pytest.raises(ValueError, match="no tool plan"):
    tool_tasks.tool_plan("What colour is the sky?")


def test_price_demonstration_is_exact():
  q = tiny_tasks.Question("How much do 9 sacks of salt cost?", "36",
                          "9 sacks of salt cost 36 coins.", "")
  assert tool_tasks.demonstration(q) == [
      {"from": "user", "value": "How much do 9 sacks of salt cost?"},
      {"from": "assistant", "value": "<tool>lookup: salt, price</tool>"},
      {"from": "tool", "value": "A sack of salt costs 4 coins."},
      {"from": "assistant", "value": "<tool>calc: 9 * 4</tool>"},
      {"from": "tool", "value": "9 * 4 = 36"},
      {"from": "assistant", "value": "9 sacks of salt cost 36 coins."}]


def test_tool_demonstrations_as_a_data_source(tmp_path):
  config = sft.get_config("tiny_tools")
  config.data.update(dict(tiny_task_train_records=12, tiny_task_eval_records=5))
  train = sources.load_records(config.data, "conversations", "train", str(tmp_path))
  held = sources.load_records(config.data, "conversations", "eval", str(tmp_path))
  assert len(train) == 12 and len(held) == 5
  assert (tmp_path / "data" / "tiny_tools-train.jsonl").exists()
  assert all(any(t.role == "tool" for t in conv) for conv in train)
  # Train demonstrations use train questions only: none is a validation question.
  validation = {q.text for q in tiny_tasks.questions("validation", 2000)}
  assert not {conv[0].content for conv in train} & validation
  in_memory = sources.load_records(config.data, "conversations", "train")
  assert list(in_memory) == list(train)


def test_counterfactual_demonstrations_answer_from_their_results():
  records = tool_tasks.tool_records("train", 200)
  real_world = tiny_world_tools()["lookup"]
  convs = [r["conversations"] for r in records]
  assert len(convs) == 200
  validation = {q.text for q in tiny_tasks.questions("validation", 2000)}
  contradicted = 0
  for turns in convs:
    question, answer = turns[0]["value"], turns[-1]["value"]
    assert question not in validation
    results = [t["value"] for t in turns if t["from"] == "tool"]
    calls = [t["value"] for t in turns[1:-1] if t["from"] == "assistant"]
    # Whatever the world, the final answer states the last result's fact (or its number).
    fact = (answer.split(" cost ")[1].split()[0] if " cost " in answer
            else answer.rstrip(".").split()[-1])
    assert fact in results[-1].rstrip(".").split(), turns
    real = real_world(calls[0][len("<tool>lookup: "):-len("</tool>")])
    if len(results) == 1 and real != results[0]:
      contradicted += 1  # the real world's fact differs: memory gives a wrong answer
    elif len(results) == 2 and real != results[0]:
      contradicted += 1  # another price
  # Half the records are counterfactual; most of their facts differ from the real world's.
  assert 60 <= contradicted <= 100, contradicted
  # Validation records are the real world's, exactly as before.
  held = tool_tasks.tool_records("validation", 20)
  assert held == [{"conversations": tool_tasks.demonstration(q)}
                  for q in tiny_tasks.questions("validation", 20, 4)]
  assert tool_tasks.tool_records("train", 20, counterfactual=0.0) == [
      {"conversations": tool_tasks.demonstration(q)}
      for q in tiny_tasks.questions("train", 20, 4)]


def test_counterfactual_world_keeps_names_and_changes_facts():
  real, other = build_world(), tool_tasks.counterfactual_world(0)
  assert [t.name for t in real.towns] == [t.name for t in other.towns]
  assert {p.name for p in real.people} == {p.name for p in other.people}
  assert all(a.price != b.price for a, b in zip(real.goods, other.goods))
  assert [t.export for t in real.towns] != [t.export for t in other.towns]
  assert tool_tasks.counterfactual_world(0) == other  # deterministic
  assert tool_tasks.counterfactual_world(1) != other

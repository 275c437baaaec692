"""Tool-use demonstrations of the tiny world, for SFT: question -> calls -> results -> answer.

Each tiny-world question (data/tiny_tasks.py) is answered the way a tool user would: look the
fact up, compute with the calculator where the question needs arithmetic, then answer in the
question's own reference sentence. The results are the tools' own (data/tools.py), so a
demonstration shows exactly what the environment will return. One ShareGPT record with tool
turns (docs/formats.md):

  {"conversations": [
     {"from": "user", "value": "How much do 9 sacks of barley cost?"},
     {"from": "assistant", "value": "<tool>lookup: barley, price</tool>"},
     {"from": "tool", "value": "A sack of barley costs 2 coins."},
     {"from": "assistant", "value": "<tool>calc: 9 * 2</tool>"},
     {"from": "tool", "value": "18"},
     {"from": "assistant", "value": "9 sacks of barley cost 18 coins."}]}

The calls per question form (`tool_plan`):

  Which town makes G? / Where does G come from?    lookup: G, maker
  What does T export? / What is T known for?      lookup: T, export
  How much do N units of G cost?                  lookup: G, price, then calc: N * price
  How far is it from A to B?                      lookup: A, B
  Who is the mayor of T?                          lookup: T, mayor
  On which day is the market in T?                lookup: T, market
  Where does P live?                              lookup: P, town
  What does P make?                               lookup: P, makes

Splits follow the questions': train demonstrations use train questions only, so the RL
prompts (validation questions, data/tiny_tasks.py `ensure_unseen_prompts`) are never
demonstrated.
"""

from __future__ import annotations

import os
import re

from data import chat_template, tiny_tasks
from data.tools import tiny_world_tools
from data.world import build_world

_NAME = r"([A-Za-z]+)"
# (question pattern, match -> [(tool, arguments)]); the price question's calc needs the price.
_PLANS = (
    (rf"Which town makes {_NAME}\?|Where does {_NAME} come from\?",
     lambda m: [("lookup", f"{m[1] or m[2]}, maker")]),
    (rf"What does {_NAME} export\?|What is {_NAME} known for\?",
     lambda m: [("lookup", f"{m[1] or m[2]}, export")]),
    (rf"How much do (\d+) [a-z]+ of {_NAME} cost\?",
     lambda m: [("lookup", f"{m[2]}, price"),
                ("calc", f"{m[1]} * {build_world().good(m[2]).price}")]),
    (rf"How far is it from {_NAME} to {_NAME}\?", lambda m: [("lookup", f"{m[1]}, {m[2]}")]),
    (rf"Who is the mayor of {_NAME}\?", lambda m: [("lookup", f"{m[1]}, mayor")]),
    (rf"On which day is the market in {_NAME}\?", lambda m: [("lookup", f"{m[1]}, market")]),
    (rf"Where does {_NAME} live\?", lambda m: [("lookup", f"{m[1]}, town")]),
    (rf"What does {_NAME} make\?", lambda m: [("lookup", f"{m[1]}, makes")]),
)


def tool_plan(question: str) -> list[tuple[str, str]]:
  """The (tool, arguments) calls that answer a tiny-world `question` (module docstring).

  Raises:
    ValueError: a question of no known form.
  """
  for pattern, plan in _PLANS:
    match = re.fullmatch(pattern, question)
    if match:
      return plan(match)
  raise ValueError(f"no tool plan for the question {question!r}")


def demonstration(question: tiny_tasks.Question, tools=None) -> list[dict]:
  """The ShareGPT turns of one tool-use demonstration of `question`."""
  tools = tools or tiny_world_tools()
  turns = [{"from": "user", "value": question.text}]
  for name, arguments in tool_plan(question.text):
    result = tools[name](arguments)
    turns += [{"from": "assistant", "value": chat_template.format_tool_call(name, arguments)},
              {"from": "tool", "value": result}]
  return turns + [{"from": "assistant", "value": question.response}]


def tool_records(split: str, num: int, seed: int = 0) -> list[dict]:
  """`num` demonstration records of `split` ('train' | 'validation')."""
  tools = tiny_world_tools()
  return [{"conversations": demonstration(q, tools)}
          for q in tiny_tasks.questions(split, num, seed + 4)]


def ensure_tool_demos(out_dir: str, num_train: int, num_validation: int,
                      seed: int = 0) -> dict:
  """Writes `{out_dir}/tiny_tools-{split}.jsonl` (if not already identical) and returns the
  paths as {'train': ..., 'validation': ...}."""
  paths = {}
  for split, num in (("train", num_train), ("validation", num_validation)):
    path = os.path.join(out_dir, f"tiny_tools-{split}.jsonl")
    tiny_tasks._write_if_changed(path, tool_records(split, num, seed))  # the tiny tasks' writer
    paths[split] = path
  return paths

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
     {"from": "tool", "value": "9 * 2 = 18"},
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

Counterfactual demonstrations (`COUNTERFACTUAL_SHARE` of the train records): the same names
in another world (`counterfactual_world`: other towns' exports, mayors, residents, roads,
other prices), its tools' results and its answers. A model tuned only on the real world's
questions can give the final answer from memory and ignore the result it was handed; in a
counterfactual demonstration memory gives the wrong answer and only the result gives the
right one, so the loss teaches reading the result (docs/results_rl.md, "Tools"). Validation
records are the real world's only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import re

from data import chat_template, tiny_tasks
from data.tools import Lookup, calc_tool, tiny_world_tools
from data.world import WORLD_SEED, World, build_world

# Share of the train demonstrations set in counterfactual worlds, and how many such worlds.
COUNTERFACTUAL_SHARE = 0.5
COUNTERFACTUAL_WORLDS = 8

_NAME = r"([A-Za-z]+)"
# (question pattern, (match, world) -> [(tool, arguments)]); the price question's calc needs
# the price, which the lookup before it returns.
_PLANS = (
    (rf"Which town makes {_NAME}\?|Where does {_NAME} come from\?",
     lambda m, w: [("lookup", f"{m[1] or m[2]}, maker")]),
    (rf"What does {_NAME} export\?|What is {_NAME} known for\?",
     lambda m, w: [("lookup", f"{m[1] or m[2]}, export")]),
    (rf"How much do (\d+) [a-z]+ of {_NAME} cost\?",
     lambda m, w: [("lookup", f"{m[2]}, price"), ("calc", f"{m[1]} * {w.good(m[2]).price}")]),
    (rf"How far is it from {_NAME} to {_NAME}\?",
     lambda m, w: [("lookup", f"{m[1]}, {m[2]}")]),
    (rf"Who is the mayor of {_NAME}\?", lambda m, w: [("lookup", f"{m[1]}, mayor")]),
    (rf"On which day is the market in {_NAME}\?",
     lambda m, w: [("lookup", f"{m[1]}, market")]),
    (rf"Where does {_NAME} live\?", lambda m, w: [("lookup", f"{m[1]}, town")]),
    (rf"What does {_NAME} make\?", lambda m, w: [("lookup", f"{m[1]}, makes")]),
)


def tool_plan(question: str, world: World | None = None) -> list[tuple[str, str]]:
  """The (tool, arguments) calls that answer a `question` about `world` (default: the tiny
  world's; module docstring).

  Raises:
    ValueError: a question of no known form.
  """
  for pattern, plan in _PLANS:
    match = re.fullmatch(pattern, question)
    if match:
      return plan(match, world or build_world())
  raise ValueError(f"no tool plan for the question {question!r}")


@functools.lru_cache(maxsize=COUNTERFACTUAL_WORLDS)
def counterfactual_world(k: int) -> World:
  """Counterfactual world `k`: the tiny world's names and goods, built from another seed
  (other exports, mayors, residents, positions and roads), each good at another price."""
  world = build_world(WORLD_SEED + 1 + k)
  rng = random.Random(f"tool-tasks/counterfactual/{k}")
  goods = tuple(dataclasses.replace(g, price=rng.choice([p for p in range(2, 13)
                                                         if p != g.price]))
                for g in world.goods)
  return dataclasses.replace(world, goods=goods)


def demonstration(question: tiny_tasks.Question, tools=None, world: World | None = None
                  ) -> list[dict]:
  """The ShareGPT turns of one tool-use demonstration of `question` about `world` (default:
  the tiny world's), with `tools` over that world."""
  tools = tools or tiny_world_tools()
  turns = [{"from": "user", "value": question.text}]
  for name, arguments in tool_plan(question.text, world):
    result = tools[name](arguments)
    turns += [{"from": "assistant", "value": chat_template.format_tool_call(name, arguments)},
              {"from": "tool", "value": result}]
  return turns + [{"from": "assistant", "value": question.response}]


def tool_records(split: str, num: int, seed: int = 0,
                 counterfactual: float = COUNTERFACTUAL_SHARE) -> list[dict]:
  """`num` demonstration records of `split` ('train' | 'validation'); on 'train', a
  `counterfactual` share of them set in the counterfactual worlds (module docstring), mixed
  in a fixed order (without them, the real world's questions in their own order)."""
  num_cf = round(num * counterfactual) if split == "train" else 0
  tools = tiny_world_tools()
  records = [{"conversations": demonstration(q, tools)}
             for q in tiny_tasks.questions(split, num - num_cf, seed + 4)]
  for k in range(COUNTERFACTUAL_WORLDS):
    count = num_cf // COUNTERFACTUAL_WORLDS + (k < num_cf % COUNTERFACTUAL_WORLDS)
    world = counterfactual_world(k)
    tools = {"lookup": Lookup(world), "calc": calc_tool}
    records += [{"conversations": demonstration(q, tools, world)}
                for q in tiny_tasks.questions(split, count, seed + 4 + 1000 * (k + 1), world)]
  if num_cf:
    random.Random(f"tool-tasks/order/{seed}/{split}").shuffle(records)
  return records


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

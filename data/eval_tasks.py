"""Evaluation tasks (docs/formats.md, "Evaluation tasks"): records read from JSONL task files,
or generated from the tiny world, for training/task_eval.py.

    {"type": "multiple_choice", "context": "...", "choices": ["...", ...], "answer": 2}
    {"type": "generation", "prompt": "...", "answer": "...", "checker": "math"}
    {"type": "perplexity", "text": "..."}

A file may mix types; each type is scored on its own. A `.txt` file is a perplexity task,
one document per non-blank line. Built-in tasks, generated rather than read:

    tiny_world_mc   4-way multiple choice over held-out tiny-world questions: the correct
                    full-sentence reply against three of the same form naming another town,
                    good, person, day or number (data/tiny_tasks.py questions)
    tiny_world_qa   generation: the same questions, scored by the `tiny_world` checker

`write_tiny_world_tasks(path)` writes both to a file, as a sample of the format.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

from data import tiny_tasks
from data.records import InvalidRecord, iter_jsonl_records, iter_text_records, require_text
from data.world import build_world

TYPES = ("multiple_choice", "generation", "perplexity")
BUILTIN = ("tiny_world_mc", "tiny_world_qa")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  context: str
  choices: tuple[str, ...]
  answer: int          # index of the correct choice


@dataclasses.dataclass(frozen=True)
class Generation:
  prompt: str
  answer: str
  checker: str = ""    # data/verifiers.py answer checker ('' = the run's own)


@dataclasses.dataclass(frozen=True)
class Perplexity:
  text: str


TaskItem = MultipleChoice | Generation | Perplexity


def parse_task(obj: Any) -> TaskItem:
  """One task record (see the module docstring); raises `InvalidRecord` naming the problem."""
  if not isinstance(obj, dict):
    raise InvalidRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
  kind = obj.get("type")
  if kind not in TYPES:
    raise InvalidRecord("bad_type", f"'type' must be one of {TYPES}, got {kind!r}")
  if kind == "perplexity":
    return Perplexity(require_text(obj, "text"))
  if kind == "generation":
    checker = obj.get("checker", "")
    if not isinstance(checker, str):
      raise InvalidRecord("wrong_type", "'checker' must be a string")
    return Generation(require_text(obj, "prompt"), str(obj.get("answer", "")).strip()
                      or require_text(obj, "answer"), checker)
  choices = obj.get("choices")
  if (not isinstance(choices, list) or len(choices) < 2
      or not all(isinstance(c, str) and c.strip() for c in choices)):
    raise InvalidRecord("bad_choices", "'choices' must be a list of two or more non-empty "
                        "strings")
  answer = obj.get("answer")
  if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
    raise InvalidRecord("bad_answer", f"'answer' must be the index of the correct choice "
                        f"(0..{len(choices) - 1}), got {answer!r}")
  context = obj.get("context", "")
  if not isinstance(context, str):
    raise InvalidRecord("wrong_type", "'context' must be a string")
  return MultipleChoice(context, tuple(choices), answer)


def read_tasks(path: str, limit: int = 0) -> list[TaskItem]:
  """The task items of `path` (a task JSONL file, a `.txt` perplexity file, or a BUILTIN
  name), at most `limit` (0: all)."""
  if path in BUILTIN:
    items = tiny_world_tasks(path)
  elif path.endswith(".txt"):
    items = [Perplexity(t) for t in iter_text_records(path)]
  else:
    items = list(iter_jsonl_records(path, parse_task))
  return items[:limit] if limit else items


def _alternatives(answer: str, rng: random.Random) -> list[str]:
  """Other answers of the same kind as `answer` (towns, goods, people, days or numbers)."""
  w = build_world()
  for group in ([t.name for t in w.towns], [g.name for g in w.goods],
                [p.name for p in w.people], list(_DAYS)):
    if answer in group:
      return [a for a in group if a != answer]
  value = int(answer)
  return [str(value + d) for d in rng.sample([-10, -5, -3, -2, -1, 1, 2, 3, 5, 10], 6)
          if value + d > 0]


def tiny_world_multiple_choice(num: int = 200, seed: int = 0) -> list[MultipleChoice]:
  """`num` distinct held-out questions, each with its correct reply and three wrong ones of
  the same sentence, in a shuffled order (fixed by `seed`)."""
  rng = random.Random(f"tiny-world-mc/{seed}")
  items = []
  for q in _distinct_questions(num, seed):
    wrong = [q.wrong] + [q.response.replace(q.answer, a) for a in _alternatives(q.answer, rng)
                         if q.response.replace(q.answer, a) != q.wrong]
    choices = [q.response] + rng.sample(list(dict.fromkeys(wrong)), 3)
    order = rng.sample(range(4), 4)
    items.append(MultipleChoice(q.text, tuple(choices[i] for i in order), order.index(0)))
  return items


def _distinct_questions(num: int, seed: int) -> list:
  unique = {q.text: q for q in tiny_tasks.questions("validation", 40 * num, seed)}
  return list(unique.values())[:num]


def tiny_world_tasks(name: str, num: int = 200, seed: int = 0) -> list[TaskItem]:
  """The BUILTIN task `name`."""
  if name == "tiny_world_mc":
    return list(tiny_world_multiple_choice(num, seed))
  if name == "tiny_world_qa":
    return [Generation(q.text, q.answer, "tiny_world") for q in _distinct_questions(num, seed)]
  raise ValueError(f"unknown built-in task {name!r}; choose one of {BUILTIN}")


def task_record(item: TaskItem) -> dict:
  """The JSON record of a task item (the inverse of `parse_task`)."""
  kind = {MultipleChoice: "multiple_choice", Generation: "generation",
          Perplexity: "perplexity"}[type(item)]
  record = {"type": kind, **dataclasses.asdict(item)}
  if kind == "multiple_choice":
    record["choices"] = list(item.choices)
  return record


def write_tiny_world_tasks(path: str, num: int = 200, seed: int = 0) -> None:
  """Writes the built-in tiny-world tasks (multiple choice, then generation) as JSONL."""
  with open(path, "w", encoding="utf-8") as f:
    for name in BUILTIN:
      for item in tiny_world_tasks(name, num, seed):
        f.write(json.dumps(task_record(item)) + "\n")

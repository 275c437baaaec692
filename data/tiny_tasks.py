"""Task data of the tiny world for the post-training stages, all with checkable answers.

Every example is a question about the facts of data/world.py with one short reference answer
(a town, a good, a name, a weekday or a number), so held-out quality is measured exactly:
a reply is right when it contains the reference answer (`answer_correct`).

  questions      `Question(text, answer, response)`: the atom everything else is built from.
  SFT            Alpaca records (one question) and ShareGPT records (two or three questions in
                 one conversation, sometimes with a system turn).
  preferences    {prompt, chosen, rejected}: chosen is the correct response, rejected a fluent
                 but wrong one (a wrong town / number / name) or an evasive one; also the
                 labelled-ShareGPT form.
  feedback       KTO: {prompt, completion, label} from the same pairs, unpaired.
  prompts        {prompt, answer} for RL with a verifiable reward and for synthesis; also the
                 'unseen' RL prompt set: validation questions (never trained on by SFT) split
                 in two by a hash of their text, half to train RL on, half held out.

Splits: a question template instance goes to validation when the CRC-32 of its text falls in
one bucket of `_VALIDATION_BUCKETS`, so train and validation never share a question.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import zlib

from data.world import World, build_world

SPLITS = ("train", "validation")
_VALIDATION_BUCKETS = 5
_SYSTEM_PROMPTS = ("You answer questions about the towns briefly.",
                   "Answer in one short sentence.", "You are a helpful guide to the land.")
_EVASIVE = ("I do not know.", "That is hard to say.", "Nobody can tell.",
            "You should ask someone else.")


@dataclasses.dataclass(frozen=True)
class Question:
  text: str        # the user's question
  answer: str      # the short reference answer
  response: str    # a correct full-sentence reply containing the answer
  wrong: str       # a fluent reply with a wrong answer (for rejected responses)


def _wrong(rng: random.Random, right, options) -> str:
  return rng.choice([o for o in options if o != right])


def _questions(w: World, rng: random.Random) -> Question:
  """One random question with its right and a wrong reply."""
  kind = rng.randrange(8)
  towns = [t.name for t in w.towns]
  if kind == 0:
    g = rng.choice(w.goods)
    t = w.maker_of(g.name).name
    bad = _wrong(rng, t, towns)
    text = rng.choice([f"Which town makes {g.name}?", f"Where does {g.name} come from?"])
    return Question(text, t, f"{g.name.capitalize()} comes from {t}.",
                    f"{g.name.capitalize()} comes from {bad}.")
  if kind == 1:
    t = rng.choice(w.towns)
    bad = _wrong(rng, t.export, [g.name for g in w.goods])
    text = rng.choice([f"What does {t.name} export?", f"What is {t.name} known for?"])
    return Question(text, t.export, f"{t.name} is known for its {t.export}.",
                    f"{t.name} is known for its {bad}.")
  if kind == 2:
    g, n = rng.choice(w.goods), rng.randint(2, 9)
    total = n * g.price
    bad = str(total + rng.choice([-2 * g.price, -g.price, g.price, 1, -1, 2 * g.price]))
    text = f"How much do {g.amount(n)} cost?"
    return Question(text, str(total), f"{g.amount(n).capitalize()} cost {total} coins.",
                    f"{g.amount(n).capitalize()} cost {bad} coins.")
  if kind == 3:
    r = rng.choice(w.roads)
    a, b = (r.a, r.b) if rng.random() < 0.5 else (r.b, r.a)
    bad = str(r.miles + rng.choice([-5, -3, 3, 5, 8]))
    text = f"How far is it from {a} to {b}?"
    return Question(text, str(r.miles), f"It is {r.miles} miles from {a} to {b}.",
                    f"It is {bad} miles from {a} to {b}.")
  if kind == 4:
    t = rng.choice(w.towns)
    bad = _wrong(rng, t.mayor, [p.name for p in w.people])
    return Question(f"Who is the mayor of {t.name}?", t.mayor,
                    f"The mayor of {t.name} is {t.mayor}.",
                    f"The mayor of {t.name} is {bad}.")
  if kind == 5:
    t = rng.choice(w.towns)
    days = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
    bad = _wrong(rng, t.market_day, days)
    return Question(f"On which day is the market in {t.name}?", t.market_day,
                    f"The market in {t.name} is on {t.market_day}.",
                    f"The market in {t.name} is on {bad}.")
  if kind == 6:
    p = rng.choice(w.people)
    bad = _wrong(rng, p.town, towns)
    return Question(f"Where does {p.name} live?", p.town, f"{p.name} lives in {p.town}.",
                    f"{p.name} lives in {bad}.")
  p = rng.choice(w.people)
  good = w.trade_good(p.trade).name
  bad = _wrong(rng, good, [g.name for g in w.goods])
  return Question(f"What does {p.name} make?", good, f"{p.name} makes {good}.",
                  f"{p.name} makes {bad}.")


def _split_of(text: str) -> str:
  return "validation" if zlib.crc32(text.encode()) % _VALIDATION_BUCKETS == 0 else "train"


def questions(split: str, num: int, seed: int = 0, world: World | None = None
              ) -> list[Question]:
  """`num` questions of `split` (questions repeat within a split; never across splits) about
  `world` (default: the tiny world's; another world's questions keep the split by text)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  w, rng, out = world or build_world(), random.Random(f"tiny-tasks/{seed}/{split}"), []
  while len(out) < num:
    q = _questions(w, rng)
    if _split_of(q.text) == split:
      out.append(q)
  return out


def alpaca_records(split: str, num: int, seed: int = 0) -> list[dict]:
  return [{"instruction": q.text, "output": q.response} for q in questions(split, num, seed)]


def sharegpt_records(split: str, num: int, seed: int = 0) -> list[dict]:
  """Multi-turn conversations of 2-3 questions, a third of them with a system prompt."""
  rng = random.Random(f"tiny-tasks/sharegpt/{seed}/{split}")
  pool = questions(split, 3 * num, seed + 1)
  records = []
  for i in range(num):
    turns = []
    if rng.random() < 1 / 3:
      turns.append({"from": "system", "value": rng.choice(_SYSTEM_PROMPTS)})
    for q in pool[3 * i:3 * i + rng.randint(2, 3)]:
      turns += [{"from": "human", "value": q.text}, {"from": "gpt", "value": q.response}]
    records.append({"conversations": turns})
  return records


def preference_records(split: str, num: int, seed: int = 0) -> list[dict]:
  """{prompt, chosen, rejected}: rejected is wrong three times in four, else evasive."""
  rng = random.Random(f"tiny-tasks/preferences/{seed}/{split}")
  return [{"prompt": q.text, "chosen": q.response,
           "rejected": q.wrong if rng.random() < 0.75 else rng.choice(_EVASIVE)}
          for q in questions(split, num, seed + 2)]


def sharegpt_preference_records(split: str, num: int, seed: int = 0) -> list[dict]:
  """Two questions per conversation, each answered by a chosen and a rejected candidate."""
  pairs = preference_records(split, 2 * num, seed)
  records = []
  for first, second in zip(pairs[0::2], pairs[1::2]):
    turns = []
    for p in (first, second):
      turns += [{"from": "user", "value": p["prompt"]},
                {"from": "assistant", "value": p["chosen"], "label": "chosen"},
                {"from": "assistant", "value": p["rejected"], "label": "rejected"}]
    records.append({"conversations": turns})
  return records


def feedback_records(split: str, num: int, seed: int = 0) -> list[dict]:
  """KTO: alternately the chosen (label true) and the rejected (false) side of pairs."""
  return [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"],
           "label": i % 2 == 0} for i, p in enumerate(preference_records(split, num, seed))]


def prompt_records(split: str, num: int, seed: int = 0) -> list[dict]:
  return [{"prompt": q.text, "answer": q.answer} for q in questions(split, num, seed + 3)]


_NORMALISE = re.compile(r"[^a-z0-9]+")


def answer_correct(reply: str, answer: str) -> bool:
  """Whether `reply` states `answer` as a whole word (case and punctuation ignored)."""
  words = f" {_NORMALISE.sub(' ', reply.lower()).strip()} "
  return f" {_NORMALISE.sub(' ', answer.lower()).strip()} " in words


KINDS = {"alpaca": alpaca_records, "sharegpt": sharegpt_records,
         "preferences": preference_records, "sharegpt_preferences": sharegpt_preference_records,
         "feedback": feedback_records, "prompts": prompt_records}


def ensure_tiny_tasks(out_dir: str, kind: str, num_train: int, num_validation: int,
                      seed: int = 0) -> dict:
  """Writes `{out_dir}/tiny_{kind}-{split}.jsonl` (if not already identical) and returns the
  paths as {'train': ..., 'validation': ...}."""
  if kind not in KINDS:
    raise ValueError(f"unknown tiny task kind {kind!r}; choose one of {sorted(KINDS)}")
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for split, num in (("train", num_train), ("validation", num_validation)):
    path = os.path.join(out_dir, f"tiny_{kind}-{split}.jsonl")
    _write_if_changed(path, KINDS[kind](split, num, seed))
    paths[split] = path
  return paths


def held_out_half(prompt: str) -> bool:
  """Splits the unseen questions in two by a hash of their text (independent of the
  train / validation split of the questions)."""
  return zlib.crc32(f"rl-eval/{prompt}".encode()) % 2 == 1


def ensure_unseen_prompts(out_dir: str, num: int, seed: int = 0) -> dict:
  """The 'unseen' RL prompt set: `num` validation {prompt, answer} records split by
  `held_out_half` into `{out_dir}/tiny_prompts_unseen-train.jsonl` (RL trains on these) and
  `tiny_prompts_unseen-eval.jsonl` (held out from every stage), each written if not already
  identical. Returns the paths as {'train': ..., 'validation': ...}."""
  records = prompt_records("validation", num, seed=seed)
  paths = {}
  for split, name, held_out in (("train", "train", False), ("validation", "eval", True)):
    path = os.path.join(out_dir, f"tiny_prompts_unseen-{name}.jsonl")
    _write_if_changed(path, [r for r in records if held_out_half(r["prompt"]) == held_out])
    paths[split] = path
  return paths


def _write_if_changed(path: str, records: list[dict]) -> None:
  """One JSON line per record, written then renamed (a concurrent reader never sees half a
  file), unless the file already holds exactly that text."""
  text = "".join(json.dumps(r) + "\n" for r in records)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)

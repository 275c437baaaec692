"""The tiny world's text corpora, sampled from the facts in data/world.py.

Two domains:

- `"world"` (pretraining): prose paragraphs about a town, a person, a trading trip, sums
  over prices and distances, and comparisons of towns. Every fact is stated through several
  templates, so a model must learn the facts themselves, not a template; the arithmetic
  (quantity x price, distance + distance, population differences) is always correct.
- `"chronicle"` (continued pretraining): terse dated records of the same towns: market
  ledgers on each town's market day, weather logs that follow each region's climate by
  season, and caravan logs along the real roads. Same facts, different register.

A document is 2-6 sentences (20-120 words). Splits share the world but never a document:
a candidate document belongs to validation when the CRC-32 of its text falls in one bucket
out of `_VALIDATION_BUCKETS`, otherwise to train, whatever seed or size was asked for.
"""

import json
import os
import random
import zlib
from typing import Callable

from data.world import (World, _CLIMATE, _MONTHS, _NUMBER_WORDS, _SEASON_NAMES, _a, _pronoun,
                        _series, _where, build_world)

DOMAINS = ("world", "chronicle")
SPLITS = ("train", "validation")
_VALIDATION_BUCKETS = 10  # 1 candidate document in 10 is held out.
_MIN_WORDS, _MAX_WORDS = 20, 120  # short ones fill the gaps when packing 128-token rows


# A generator returns the sentences of one document: the first introduces its subject.
def _town_doc(w: World, rng: random.Random) -> list:
  t = rng.choice(w.towns)
  g = w.good(t.export)
  where = _where(t.region)
  first = rng.choice([f"{t.name} is a town {where}.", f"{t.name} lies {where}.",
                      f"{where.capitalize()} there is a town called {t.name}.",
                      f"This is about {t.name}, a town {where}."])
  it = rng.choice(["It", "The town", t.name])
  near = w.neighbours(t.name)
  other, dist = rng.choice(near)
  imp = rng.choice(t.imports)
  rest = [
      rng.choice([f"{it} is known for its {g.name}.", f"The people of {t.name} make {g.name}.",
                  f"Most of the {g.name} in the land comes from {t.name}.",
                  f"If you want {g.name}, go to {t.name}.",
                  f"{it} sends {g.name} to the other towns."]),
      rng.choice([f"{t.name} buys {imp} from {w.maker_of(imp).name}.",
                  f"The {imp} sold in {t.name} comes from {w.maker_of(imp).name}.",
                  f"{it} gets its {imp} from {w.maker_of(imp).name}."]),
      rng.choice([f"The market of {t.name} is held every {t.market_day}.",
                  f"On {t.market_day}s the square of {t.name} fills with traders.",
                  f"{it} holds its market on {t.market_day}s."]),
      rng.choice([f"{it} is famous for its {t.landmark}.",
                  f"Visitors to {t.name} see its {t.landmark}.",
                  f"In the middle of {t.name} stands {_a(t.landmark)}."]),
      rng.choice([f"{t.name} is home to {t.population} people.",
                  f"About {t.population} people live in {t.name}.",
                  f"{it} has {t.population} people."]),
      rng.choice([f"The mayor of {t.name} is {t.mayor}.", f"{t.mayor} is the mayor of {t.name}.",
                  f"{it} is led by its mayor, {t.mayor}."]),
      rng.choice([f"A road of {dist} miles joins {t.name} and {other}.",
                  f"From {t.name} it is {dist} miles to {other}.",
                  f"{other} lies {dist} miles {w.direction(t.name, other)} of {t.name}."]),
      rng.choice([f"Roads lead from {t.name} to {_NUMBER_WORDS[len(near)]} towns: "
                  f"{_series([n for n, _ in near])}.",
                  f"{t.name} has {len(near)} neighbours: {_series([n for n, _ in near])}."]),
  ]
  for p in rng.sample(w.people_in(t.name), 2):
    rest.append(rng.choice([f"{p.name} the {p.trade} lives in {t.name}.",
                            f"In {t.name} lives {p.name}, a {p.trade}.",
                            f"One of the people of {t.name} is {p.name}, a {p.trade}."]))
  rng.shuffle(rest)  # facts about one subject come in any order
  return [first] + rest


def _person_doc(w: World, rng: random.Random) -> list:
  p = rng.choice(w.people)
  t, g = w.town(p.town), w.trade_good(p.trade)
  he = _pronoun(p)
  first = rng.choice([f"{p.name} is a {p.trade} in {p.town}.",
                      f"{p.name} lives in {p.town} and works as a {p.trade}.",
                      f"In {p.town}, {p.name} works as a {p.trade}.",
                      f"{p.name} the {p.trade} comes from {p.town}."])
  k = rng.randint(2, 9)
  other, dist = rng.choice(w.neighbours(p.town))
  rest = [
      rng.choice([f"{he} is {p.age} years old.", f"{p.name} is {p.age}.",
                  f"{p.name} is {p.age} years of age."]),
      rng.choice([f"As a {p.trade}, {p.name} makes {g.name}.",
                  f"{he} makes {g.name} and sells it by the {g.unit}.",
                  f"{p.name} makes {g.name}, which sells for {g.price} coins a {g.unit}."]),
      rng.choice([f"{he} sells {g.amount(k)} at {g.price} coins each and earns "
                  f"{k * g.price} coins.",
                  f"When {p.name} sells {g.amount(k)}, {he.lower()} gets {k} times {g.price}, "
                  f"or {k * g.price} coins."]),
      rng.choice([f"On {t.market_day}s {p.name} goes to the market of {p.town}.",
                  f"{he} sells at the {t.market_day} market."]),
      rng.choice([f"To visit {other}, {p.name} walks {dist} miles.",
                  f"{p.name} often walks the {dist} miles to {other}."]),
  ]
  if t.mayor == p.name:
    rest.append(rng.choice([f"{p.name} is also the mayor of {p.town}.",
                            f"{he} is the mayor of {p.town}."]))
  if p.sibling:
    s = w.person(p.sibling)
    rest.append(rng.choice([f"{p.name} and {s.name} are siblings.",
                            f"{p.name} has a sibling, {s.name}, who lives in {s.town}.",
                            f"{he} visits {s.name}, a {s.trade} in {s.town}."]))
  rng.shuffle(rest)
  return [first] + rest


def _trip_doc(w: World, rng: random.Random) -> list:
  t = rng.choice(w.towns)
  buyer = w.town(rng.choice([n for n, _ in w.neighbours(t.name)]))
  g, dist = w.good(t.export), dict(w.neighbours(t.name))[buyer.name]
  p = next(q for q in w.people_in(t.name) if q.trade == g.trade)
  k = rng.randint(2, 12)
  return [rng.choice([f"One {t.market_day}, {p.name} the {p.trade} left {t.name} with "
                      f"{g.amount(k)}.",
                      f"{p.name} of {t.name} loaded {g.amount(k)} onto a cart."]),
          f"{_pronoun(p)} walked {dist} miles {w.direction(t.name, buyer.name)} "
          f"to {buyer.name}.",
          rng.choice([f"In {buyer.name} a {g.unit} of {g.name} sells for {g.price} coins.",
                      f"The traders of {buyer.name} pay {g.price} coins for a {g.unit}."]),
          f"So {p.name} sold {g.amount(k)} for {k} times {g.price}, which is "
          f"{k * g.price} coins.",
          rng.choice([f"Then {p.name} walked the {dist} miles home.",
                      f"On the way back {p.name} saw the {buyer.landmark} of {buyer.name}."])]


def _sum_doc(w: World, rng: random.Random) -> list:
  a = rng.choice(w.towns)
  b_name, d1 = rng.choice(w.neighbours(a.name))
  c_name, d2 = rng.choice([n for n in w.neighbours(b_name) if n[0] != a.name])
  ga, gb = rng.sample(w.goods, 2)
  m, n = rng.randint(2, 9), rng.randint(2, 9)
  trip = [f"From {a.name} to {b_name} is {d1} miles.",
          f"From {b_name} to {c_name} is {d2} miles.",
          f"So the trip from {a.name} to {c_name} by way of {b_name} is {d1} plus {d2}, "
          f"which is {d1 + d2} miles."]
  cart = [f"A cart holds {ga.amount(m)} and {gb.amount(n)}.",
          f"The {ga.name} is worth {m} times {ga.price}, or {m * ga.price} coins, and the "
          f"{gb.name} {n} times {gb.price}, or {n * gb.price} coins.",
          f"Together that is {m * ga.price + n * gb.price} coins."]
  return trip + cart[:rng.randint(0, 3)] if rng.random() < 0.5 else cart + trip[:2]


def _compare_doc(w: World, rng: random.Random) -> list:
  a, b = rng.sample(w.towns, 2)
  big, small = (a, b) if a.population >= b.population else (b, a)
  diff = big.population - small.population
  facts = [rng.choice([f"{a.name} makes {a.export} and {b.name} makes {b.export}.",
                       f"{a.name} sells {a.export}, while {b.name} sells {b.export}."]),
           f"{a.name} holds its market on {a.market_day}s, {b.name} on {b.market_day}s.",
           f"{b.name} lies {w.direction(a.name, b.name)} of {a.name}.",
           f"{a.name} is {_where(a.region)} and {b.name} is {_where(b.region)}."]
  rng.shuffle(facts)
  return [f"{a.name} has {a.population} people and {b.name} has {b.population}.",
          f"So {big.name} has {diff} more people than {small.name}." if diff else
          f"So {a.name} and {b.name} are the same size."] + facts


def _ledger_doc(w: World, rng: random.Random) -> list:
  t = rng.choice(w.towns)
  season = rng.choice(_SEASON_NAMES)
  lines = [f"Market ledger of {t.name}, {t.market_day} {rng.randint(1, 28)} "
           f"{rng.choice(_MONTHS[season])}."]
  # Sellers: the town's own people and the makers of the goods it imports.
  makers = [next(q for q in w.people_in(w.maker_of(g).name) if q.trade == w.good(g).trade)
            for g in t.imports]
  total = 0
  for p in rng.sample(w.people_in(t.name) + makers, 3):
    g, k = w.trade_good(p.trade), rng.randint(1, 9)
    total += k * g.price
    lines.append(f"{p.name} of {p.town}, {p.trade}: {g.amount(k)} at {g.price}, "
                 f"{k * g.price} coins.")
  lines.append(f"Day total: {total} coins.")
  lines.append(f"Weather: {_CLIMATE[t.region][season]}.")
  return lines


def _weather_doc(w: World, rng: random.Random) -> list:
  t = rng.choice(w.towns)
  lines = [rng.choice([f"Weather log of {t.name}, {_where(t.region)}, kept by {t.mayor}.",
                       f"Weather at {t.name} ({t.region}), as written by the mayor, "
                       f"{t.mayor}."])]
  start = rng.randrange(4)
  for season in _SEASON_NAMES[start:] + _SEASON_NAMES[:start]:
    lines.append(f"{rng.choice(_MONTHS[season])}: {_CLIMATE[t.region][season]} over the "
                 f"{t.landmark}.")
  return lines


def _caravan_doc(w: World, rng: random.Random) -> list:
  t = rng.choice(w.towns)
  g, k = w.good(t.export), rng.randint(2, 20)
  lines = [f"Caravan log, day 1: left {t.name} with {g.amount(k)}."]
  prev, here, miles = None, t.name, 0
  for day in range(2, rng.randint(3, 5) + 1):
    # Caravans press on: never straight back to the town they just left.
    prev, (nxt, d) = here, rng.choice([n for n in w.neighbours(here) if n[0] != prev])
    miles += d
    lines.append(f"Day {day}: {d} miles {w.direction(here, nxt)} to {nxt}, {miles} miles "
                 f"so far.")
    here = nxt
  lines.append(f"Sold {g.amount(k)} in {here} at {g.price} each, {k * g.price} coins.")
  return lines


# (generator, weight): people and towns carry most facts, so they come most often.
_GENERATORS = {
    "world": ((_town_doc, 3), (_person_doc, 3), (_trip_doc, 2), (_sum_doc, 1),
              (_compare_doc, 1)),
    "chronicle": ((_ledger_doc, 2), (_weather_doc, 1), (_caravan_doc, 2)),
}


def _sample_document(make: Callable, w: World, rng: random.Random, whole: bool) -> str:
  """Takes the first 2-6 sentences (all when `whole`) of a document, within 120 words."""
  first, *rest = make(w, rng)
  sentences, words = [first], len(first.split())
  target = 6 if whole else rng.randint(2, 6)
  for s in rest:
    if len(sentences) >= 6 or (len(sentences) >= target and words >= _MIN_WORDS):
      break
    if words + len(s.split()) > _MAX_WORDS:
      break
    sentences.append(s)
    words += len(s.split())
  return " ".join(sentences)


def generate_documents(split: str, num_docs: int, seed: int = 0,
                       domain: str = "world") -> list:
  """Samples `num_docs` documents of `domain` for `split` from the fixed world.

  Args:
    split: 'train' or 'validation'; the two never share a document's text.
    num_docs: how many documents to return.
    seed: picks the sample of documents (the world itself is always `build_world()`).
    domain: 'world' (prose, pretraining) or 'chronicle' (records, continued pretraining).

  Returns:
    A list of `num_docs` strings, the same for the same arguments.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if domain not in DOMAINS:
    raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
  w = build_world()
  makers, weights = zip(*_GENERATORS[domain])
  rng = random.Random(f"{domain}/{split}/{seed}")
  docs = []
  while len(docs) < num_docs:
    # Records (the chronicle) are kept whole: a ledger without its total is not a ledger.
    make = rng.choices(makers, weights)[0]
    text = _sample_document(make, w, rng, whole=domain == "chronicle")
    held_out = zlib.crc32(text.encode()) % _VALIDATION_BUCKETS == 0
    if held_out == (split == "validation"):
      docs.append(text)
  return docs


def write_jsonl(path: str, docs: list) -> None:
  """Writes one `{"text": doc}` line per document to `path`."""
  _write_atomic(path, _jsonl_text(docs))


def _jsonl_text(docs: list) -> str:
  return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)


def _write_atomic(path: str, text: str) -> None:
  # Write then rename, so a concurrent reader (another host, a test) never sees half a file.
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def ensure_tiny_world(out_dir: str, num_train: int = 20_000, num_validation: int = 1_000,
                      domain: str = "world", seed: int = 0) -> dict:
  """Writes `{out_dir}/tiny_{domain}-{split}.jsonl` unless already there with this content.

  Returns:
    dict(train=path, validation=path).
  """
  paths = {}
  for split, n in (("train", num_train), ("validation", num_validation)):
    path = os.path.join(out_dir, f"tiny_{domain}-{split}.jsonl")
    text = _jsonl_text(generate_documents(split, n, seed=seed, domain=domain))
    if not _has_content(path, text):
      _write_atomic(path, text)
    paths[split] = path
  return paths


def _has_content(path: str, text: str) -> bool:
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    return f.read() == text

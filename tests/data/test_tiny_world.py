"""The tiny world: fixed facts, deterministic documents, disjoint splits, sizes."""

import collections
import json
import os
import re

import pytest

from data import tiny_world


def _sentences(doc: str) -> list:
  return re.split(r"(?<=\.) ", doc)


def test_world_is_fixed_and_consistent():
  w = tiny_world.build_world()
  assert w is tiny_world.build_world()
  assert (len(w.towns), len(w.goods), len(w.people)) == (12, 12, 48)
  # Each good is exported by exactly one town, and each town has 4 people.
  assert sorted(t.export for t in w.towns) == sorted(g.name for g in w.goods)
  assert collections.Counter(p.town for p in w.people) == {t.name: 4 for t in w.towns}
  for t in w.towns:
    assert w.person(t.mayor).town == t.name
    assert t.export not in t.imports
    assert len(w.neighbours(t.name)) >= 2
    # The town's first resident practises its trade, so its good has a maker there.
    assert any(p.trade == w.good(t.export).trade for p in w.people_in(t.name))
  for p in w.people:
    if p.sibling:
      assert w.person(p.sibling).sibling == p.name
      assert w.person(p.sibling).town != p.town
  # The roads connect every town.
  seen, todo = set(), [w.towns[0].name]
  while todo:
    town = todo.pop()
    if town not in seen:
      seen.add(town)
      todo.extend(n for n, _ in w.neighbours(town))
  assert len(seen) == 12
  road = w.roads[0]
  assert (road.b, road.miles) in w.neighbours(road.a)
  assert w.good("copper").amount(1) == "1 bar of copper"
  assert w.good("copper").amount(3) == "3 bars of copper"


@pytest.mark.parametrize("domain", tiny_world.DOMAINS)
def test_documents_deterministic_sized_and_disjoint(domain):
  train = tiny_world.generate_documents("train", 1500, domain=domain)
  valid = tiny_world.generate_documents("validation", 300, domain=domain)
  assert train == tiny_world.generate_documents("train", 1500, domain=domain)
  assert train[:100] == tiny_world.generate_documents("train", 100, domain=domain)
  assert train != tiny_world.generate_documents("train", 1500, seed=1, domain=domain)
  assert (len(train), len(valid)) == (1500, 300)
  assert not set(train) & set(valid)
  # Disjoint whatever the seed: the split is a function of the text.
  assert not set(tiny_world.generate_documents("train", 1500, seed=7, domain=domain)) & set(
      valid)
  for doc in train + valid:
    assert 2 <= len(_sentences(doc)) <= 6, doc
    assert 20 <= len(doc.split()) <= 120, doc
  # Varied: most documents are distinct.
  assert len(set(train)) > 0.85 * len(train)


def test_domains_differ():
  world = tiny_world.generate_documents("train", 500)
  chronicle = tiny_world.generate_documents("train", 500, domain="chronicle")
  assert not set(world) & set(chronicle)
  assert all(d.startswith(("Market ledger", "Weather", "Caravan log")) for d in chronicle)
  assert not any(d.startswith(("Market ledger", "Weather", "Caravan log")) for d in world)


def test_stated_facts_and_sums_are_true():
  w = tiny_world.build_world()
  docs = tiny_world.generate_documents("train", 3000)
  mayors = products = sums = roads = 0
  for doc in docs:
    for town, mayor in re.findall(r"The mayor of (\w+) is (\w+)\.", doc):
      assert w.town(town).mayor == mayor
      mayors += 1
    for a, b, c in re.findall(r"(\d+) times (\d+), (?:which is|or) (\d+)", doc):
      assert int(a) * int(b) == int(c)
      products += 1
    for a, b, c in re.findall(r"(\d+) plus (\d+), which is (\d+)", doc):
      assert int(a) + int(b) == int(c)
      sums += 1
    for miles, a, b in re.findall(r"A road of (\d+) miles joins (\w+) and (\w+)\.", doc):
      assert dict(w.neighbours(a))[b] == int(miles)
      roads += 1
  assert min(mayors, products, sums, roads) > 20


def test_chronicle_ledger_totals_add_up():
  docs = tiny_world.generate_documents("train", 600, domain="chronicle")
  ledgers = [d for d in docs if d.startswith("Market ledger")]
  assert len(ledgers) > 100
  for doc in ledgers:
    entries = [int(x) for x in re.findall(r", (\d+) coins\.", doc)]
    total = int(re.search(r"Day total: (\d+) coins\.", doc).group(1))
    assert sum(entries) == total


def test_ensure_tiny_world_writes_once(tmp_path):
  paths = tiny_world.ensure_tiny_world(str(tmp_path), num_train=50, num_validation=10)
  assert sorted(paths) == ["train", "validation"]
  with open(paths["train"], encoding="utf-8") as f:
    lines = [json.loads(line)["text"] for line in f]
  assert lines == tiny_world.generate_documents("train", 50)
  mtime = os.stat(paths["train"]).st_mtime_ns
  assert tiny_world.ensure_tiny_world(str(tmp_path), 50, 10) == paths
  assert os.stat(paths["train"]).st_mtime_ns == mtime  # same content: not rewritten
  tiny_world.ensure_tiny_world(str(tmp_path), 60, 10)
  with open(paths["train"], encoding="utf-8") as f:
    assert len(f.readlines()) == 60


def test_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    tiny_world.generate_documents("test", 1)
  with pytest.raises(ValueError, match="domain"):
    tiny_world.generate_documents("train", 1, domain="news")

"""Tiny-world task data: correct answers, disjoint splits, parseable by the record readers."""

from data import tiny_tasks
from data.conversation import read_records
from data.world import build_world


def test_answers_are_true_facts():
  w = build_world()
  for q in tiny_tasks.questions("train", 300):
    assert tiny_tasks.answer_correct(q.response, q.answer), q
    assert not tiny_tasks.answer_correct(q.wrong, q.answer), q
    if q.text.startswith("Which town makes "):
      good = q.text.removeprefix("Which town makes ").rstrip("?")
      assert q.answer == w.maker_of(good).name
    if q.text.startswith("How much do "):
      n, unit, _, good = q.text.removeprefix("How much do ").removesuffix(" cost?").split()
      assert int(q.answer) == int(n) * w.good(good).price


def test_splits_are_disjoint_and_deterministic():
  train = {q.text for q in tiny_tasks.questions("train", 2000)}
  valid = {q.text for q in tiny_tasks.questions("validation", 300)}
  assert not train & valid
  assert tiny_tasks.questions("validation", 50) == tiny_tasks.questions("validation", 50)
  assert len(valid) > 50  # enough distinct held-out questions to measure accuracy


def test_answer_correct_matches_whole_words():
  assert tiny_tasks.answer_correct("It costs 42 coins.", "42")
  assert not tiny_tasks.answer_correct("It costs 420 coins.", "42")
  assert tiny_tasks.answer_correct("The market is on monday!", "Monday")
  assert not tiny_tasks.answer_correct("", "Monday")


def test_every_kind_parses(tmp_path):
  readers = {"alpaca": "sft", "sharegpt": "sft", "preferences": "preferences",
             "sharegpt_preferences": "preferences", "feedback": "feedback",
             "prompts": "prompts"}
  for kind, reader in readers.items():
    paths = tiny_tasks.ensure_tiny_tasks(str(tmp_path), kind, 20, 10)
    records = list(read_records(paths["train"], reader))
    assert len(records) == (40 if kind == "sharegpt_preferences" else 20), kind
    assert list(read_records(paths["validation"], reader))
  pairs = list(read_records(str(tmp_path / "tiny_sharegpt_preferences-train.jsonl"),
                            "preferences"))
  assert len(pairs[1].context) == 3  # the second question sees the first's chosen answer

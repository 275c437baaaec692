"""Instruction / preference record parsing: every format, and errors that name file:line."""

import json

import pytest

from data.conversation import (Feedback, PreferencePair, Prompt, Turn, read_records)
from data.records import RecordError, SkipCounter


def write(tmp_path, rows, name="r.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_alpaca_with_and_without_input(tmp_path):
  path = write(tmp_path, [
      {"instruction": "Summarise.", "input": "The ferry leaves at six.", "output": "Six."},
      {"instruction": "Say hi.", "output": "Hi."},
      {"instruction": "Say hi.", "input": "", "output": "Hi."}])
  got = list(read_records(path, "sft"))
  assert got[0] == (Turn("user", "Summarise.\n\nThe ferry leaves at six."),
                    Turn("assistant", "Six."))
  assert got[1] == got[2] == (Turn("user", "Say hi."), Turn("assistant", "Hi."))


def test_sharegpt_and_alpaca_multiturn(tmp_path):
  path = write(tmp_path, [
      {"conversations": [{"from": "system", "value": "Be brief."},
                         {"from": "human", "value": "7 times 6?"},
                         {"from": "gpt", "value": "42."},
                         {"from": "user", "value": "Plus 1?"},
                         {"from": "assistant", "value": "43."}]},
      {"instruction": "Play a shop assistant.",
       "conversations": [{"from": "user", "value": "Shipped?"},
                         {"from": "assistant", "value": "Order number?"}]}])
  first, second = read_records(path, "sft")
  assert [t.role for t in first] == ["system", "user", "assistant", "user", "assistant"]
  assert first[2] == Turn("assistant", "42.")
  assert second[0] == Turn("system", "Play a shop assistant.")


def test_preference_formats(tmp_path):
  path = write(tmp_path, [
      {"prompt": "Prime between 10 and 15?", "chosen": "11.", "rejected": "12.", "margin": 2},
      {"conversations": [
          {"from": "user", "value": "A statistics book?"},
          {"from": "assistant", "value": "An applied text.", "label": "chosen"},
          {"from": "assistant", "value": "Search online.", "label": "rejected"},
          {"from": "assistant", "value": "It is fine.", "label": "rejected"},
          {"from": "user", "value": "Why?"},
          {"from": "assistant", "value": "Worked examples.", "label": "chosen"},
          {"from": "assistant", "value": "Dunno.", "label": "rejected"}]}])
  pairs = list(read_records(path, "preferences"))
  assert pairs[0] == PreferencePair((Turn("user", "Prime between 10 and 15?"),), "11.", "12.",
                                    2.0)
  assert len(pairs) == 4
  assert [p.rejected for p in pairs[1:3]] == ["Search online.", "It is fine."]
  # The second turn's context continues with the chosen answer of the first.
  assert pairs[3].context == (Turn("user", "A statistics book?"),
                              Turn("assistant", "An applied text."), Turn("user", "Why?"))
  assert (pairs[3].chosen, pairs[3].rejected) == ("Worked examples.", "Dunno.")


def test_feedback_and_prompts(tmp_path):
  fb = write(tmp_path, [{"prompt": "2+2?", "completion": "4", "label": True}], "f.jsonl")
  assert list(read_records(fb, "feedback")) == [Feedback((Turn("user", "2+2?"),), "4", True)]
  pr = write(tmp_path, [{"prompt": "12 plus 30?", "answer": "42"}, {"prompt": "Hi"}], "p.jsonl")
  assert list(read_records(pr, "prompts")) == [Prompt((Turn("user", "12 plus 30?"),), "42"),
                                               Prompt((Turn("user", "Hi"),), None)]


@pytest.mark.parametrize("kind,row,reason", [
    ("sft", {"instruction": "x"}, "missing_field"),
    ("sft", {"instruction": 3, "output": "y"}, "wrong_type"),
    ("sft", {"conversations": []}, "empty"),
    ("sft", {"conversations": [{"from": "robot", "value": "x"}]}, "bad_role"),
    ("sft", {"conversations": [{"from": "gpt", "value": "x"}]}, "bad_order"),
    ("sft", {"conversations": [{"from": "user", "value": "x"}]}, "no_assistant"),
    ("preferences", {"conversations": [{"from": "user", "value": "q"},
                                       {"from": "gpt", "value": "a", "label": "best"}]},
     "bad_label"),
    ("preferences", {"prompt": "q", "chosen": "a"}, "missing_field"),
    ("preferences", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
     "wrong_type"),
    ("feedback", {"prompt": "q", "completion": "a", "label": "yes"}, "wrong_type"),
    ("preferences", {"prompt": "q", "chosen": "Same.", "rejected": " Same.\n"}, "same_answer"),
    ("preferences", {"conversations": [{"from": "user", "value": "q"},
                                       {"from": "gpt", "value": "a", "label": "chosen"},
                                       {"from": "gpt", "value": "b", "label": "rejected"},
                                       {"from": "gpt", "value": "a", "label": "rejected"}]},
     "same_answer"),
])
def test_bad_records_name_file_and_line(tmp_path, kind, row, reason):
  good = {"sft": {"instruction": "a", "output": "b"},
          "preferences": {"prompt": "q", "chosen": "a", "rejected": "b"},
          "feedback": {"prompt": "q", "completion": "a", "label": False}}[kind]
  path = write(tmp_path, [good, row, good])
  with pytest.raises(RecordError) as error:
    list(read_records(path, kind))
  assert str(error.value).startswith(f"{path}:2: ")
  assert error.value.reason == reason
  counter = SkipCounter()
  assert len(list(read_records(path, kind, skip_invalid=True, counter=counter))) == 2
  assert counter.skipped == 1 and counter.reasons[reason] == 1


def test_same_answer_names_the_turns(tmp_path):
  turns = [{"from": "user", "value": "q"}, {"from": "gpt", "value": "x", "label": "rejected"},
           {"from": "gpt", "value": "x", "label": "chosen"}]
  path = write(tmp_path, [{"conversations": turns}])
  with pytest.raises(RecordError, match=r"r\.jsonl:1: turns 2 \(chosen\) and 1 \(rejected\) "
                     "are the same text"):
    list(read_records(path, "preferences"))
  path = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"},
                          {"prompt": "q", "chosen": "a", "rejected": "a"}])
  with pytest.raises(RecordError, match=r"r\.jsonl:2: 'chosen' and 'rejected' are the same"):
    list(read_records(path, "preferences"))

"""Preference / KTO records -> two-segment units -> packed batches."""

import json

import ml_collections
import numpy as np
import pytest

from data import preferences, records
from data.chat_template import render_completion, render_prompt
from data.conversation import Feedback, PreferencePair, Turn
from data.records import RecordError


def data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      source="tiny_world", train_files="", eval_files="", pairs_eval_files="",
      tiny_task="prompt", tiny_task_train_records=40, tiny_task_eval_records=12,
      chat_template="default", seq_len=160, shuffle=True, packing=True, pack_bins=4,
      skip_invalid=False, worker_count=0))
  config.update(overrides)
  return config


def test_truncate_keeps_bos_cuts_old_prompt_then_completions():
  prompt, completions = list(range(100, 110)), [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
  # Fits: unchanged.
  assert preferences.truncate(prompt, completions, 16) == (prompt, completions)
  # 10 + 6 > 12: the prompt keeps max(12 - 6, 6) = 6 tokens (BOS + its last 5).
  kept, cut = preferences.truncate(prompt, completions, 12)
  assert kept == [100, 105, 106, 107, 108, 109] and cut == completions
  # 10 + 6 > 8: the prompt keeps half the budget (4), completions the rest (4).
  kept, cut = preferences.truncate(prompt, completions, 8)
  assert kept == [100, 107, 108, 109] and cut == [[1, 2, 3], [4, 5, 6, 7]]


def test_encode_unit_layouts():
  fields = {"example_ids": ((7, 7), np.int32), "margins": ((0.5, 0.5), np.float32)}
  shifted = preferences.encode_unit([2, 20, 21], [[30, 31], [40]], seq_len=64, shift=True,
                                    fields=fields)
  first, second = shifted
  assert first["inputs"].tolist() == [2, 20, 21, 30]
  assert first["targets"].tolist() == [20, 21, 30, 31]
  assert first["loss_mask"].tolist() == [0, 0, 1, 1]  # completion targets only
  assert second["inputs"].tolist() == [2, 20, 21] and second["loss_mask"].tolist() == [0, 0, 1]
  assert first["sides"].tolist() == [1] * 4 and second["sides"].tolist() == [2] * 3
  assert first["example_ids"].tolist() == [7] * 4 and second["margins"].tolist() == [0.5] * 3
  whole = preferences.encode_unit([2, 20, 21], [[30, 31], [40]], seq_len=64, shift=False,
                                  fields={})
  assert whole[0]["inputs"].tolist() == [2, 20, 21, 30, 31]  # ends with the last real token
  assert whole[0]["loss_mask"].tolist() == [0, 0, 0, 1, 1]
  # Each segment gets at most seq_len // 2 positions, so a pair always shares a row.
  long = preferences.encode_unit(list(range(2, 40)), [list(range(50, 90))] * 2, seq_len=32,
                                 shift=True, fields={})
  assert [len(s["inputs"]) for s in long] == [16, 16]


def test_encode_example_pairs_and_feedback(tiny_tokenizer):
  context = (Turn("user", "Where does fish come from?"),)
  pairs = [PreferencePair(context, "Fish comes from Oakhurst.", "I do not know.", 1.5)]
  encode = preferences.EncodeExample(pairs, tiny_tokenizer, template="default", seq_len=128,
                                     shift=True, reference=np.array([[-3.0, -9.0]]))
  chosen, rejected = encode(0)
  prompt = render_prompt(tiny_tokenizer, context)
  want = prompt + render_completion(tiny_tokenizer, "Fish comes from Oakhurst.")
  assert chosen["inputs"].tolist() == want[:-1] and chosen["targets"].tolist() == want[1:]
  assert chosen["loss_mask"].sum() == len(want) - len(prompt)
  assert chosen["margins"][0] == 1.5 and rejected["reference_logps"][0] == -9.0
  feedback = [Feedback(context, "Fish comes from Oakhurst.", True),
              Feedback((Turn("user", "Who?"),), "Nobody.", False)]
  encode = preferences.EncodeExample(feedback, tiny_tokenizer, template="default",
                                     seq_len=128, shift=True)
  completion, mismatched = encode(0)
  # The mismatched segment: this prompt, the next example's completion (for KTO's KL term).
  want = prompt + render_completion(tiny_tokenizer, "Nobody.")
  assert mismatched["inputs"].tolist() == want[:-1]
  assert completion["desirable"][0] == 1.0 and encode(1)[0]["desirable"][0] == 0.0


def _batches(config, tokenizer, workdir, **kwargs):
  kwargs = dict(dict(kind="preferences", split="eval", batch_size=4, shift=True), **kwargs)
  return list(preferences.make_preference_dataset(config, tokenizer, workdir=workdir, **kwargs))


def test_packed_batches_hold_each_pair_once_in_slot_order(tiny_tokenizer, tmp_path):
  batches = _batches(data_config(), tiny_tokenizer, str(tmp_path))
  seen = []
  for batch in batches:
    assert batch["inputs"].shape == (4, 160)
    for row in range(4):
      seg, sides, ids = batch["segment_ids"][row], batch["sides"][row], batch["example_ids"][row]
      count = seg.max()
      assert count % 2 == 0
      for s in range(1, count + 1):
        assert set(sides[seg == s]) == {2 - s % 2}  # odd segments first, even second
      firsts = [ids[seg == s][0] for s in range(1, count + 1, 2)]
      assert firsts == [ids[seg == s][0] for s in range(2, count + 1, 2)]
      seen += firsts
  assert sorted(seen) == list(range(12))  # eval: every pair once, one pass
  assert max(b["segment_ids"].max() for b in batches) > 2  # pairs were packed together
  unpacked = _batches(data_config(packing=False), tiny_tokenizer, str(tmp_path))
  assert all(b["segment_ids"].max() <= 2 for b in unpacked)
  assert sum(int((b["sides"] == 1).any(axis=1).sum()) for b in unpacked) == 12


def test_train_split_shards_and_sharegpt_and_feedback(tiny_tokenizer, tmp_path):
  config = data_config(tiny_task="sharegpt")
  examples, _ = preferences.load_examples(config, "preferences", "train", str(tmp_path))
  assert len(examples) == 80 and len(examples[1].context) == 3  # two pairs per record
  # One shuffled epoch split over two shards: disjoint, together every example once.
  shards = []
  for k in range(2):
    ids = [b["example_ids"][b["sides"] == 1] for b in _batches(
        config, tiny_tokenizer, str(tmp_path), split="train", num_epochs=1, shard_index=k,
        shard_count=2)]
    shards.append(set(np.concatenate(ids).tolist()))
  assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(80))
  batch = _batches(data_config(), tiny_tokenizer, str(tmp_path), kind="feedback")[0]
  assert "desirable" in batch and "margins" not in batch
  # KTO's held-out pairs come from the preference records.
  pairs, _ = preferences.load_examples(data_config(), "feedback", "pairs_eval", str(tmp_path))
  assert isinstance(pairs[0], PreferencePair) and len(pairs) == 12


def test_bad_records_name_file_and_line_or_are_skipped(tiny_tokenizer, tmp_path):
  path = tmp_path / "prefs.jsonl"
  lines = [{"prompt": "Name a prime.", "chosen": "11.", "rejected": "12."},
           {"prompt": "Name a prime.", "chosen": "13."},
           {"conversations": [{"from": "user", "value": "Hi?"},
                              {"from": "assistant", "value": "Hello.", "label": "best"}]},
           {"conversations": []},
           {"prompt": 5, "chosen": "a", "rejected": "b"},
           {"prompt": "Name a prime.", "chosen": "2.", "rejected": "4.", "margin": 2.0}]
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  config = data_config(source="files", train_files=str(path), eval_files=str(path))
  with pytest.raises(RecordError, match=f"{path}:2: missing field 'rejected'"):
    preferences.load_examples(config, "preferences", "eval")
  config.skip_invalid = True
  examples, counter = preferences.load_examples(config, "preferences", "eval")
  assert [e.chosen for e in examples] == ["11.", "2."] and examples[1].margin == 2.0
  assert counter.skipped == 4
  assert dict(counter.reasons) == {"missing_field": 1, "bad_label": 1, "empty": 1,
                                   "wrong_type": 1}
  batch = _batches(config, tiny_tokenizer, None)[0]
  assert sorted(set(batch["margins"][batch["sides"] == 1].tolist())) == [0.0, 2.0]


def test_pairs_with_the_same_answer_are_rejected_or_skipped_and_logged(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(records.logging, "warning",
                      lambda message, *args: warnings.append(message % args))
  same = {"prompt": "Name a prime.", "chosen": "11.", "rejected": "11."}
  sharegpt_same = {"conversations": [{"from": "user", "value": "Hi?"},
                                     {"from": "gpt", "value": "Hello.", "label": "chosen"},
                                     {"from": "gpt", "value": "Hello.", "label": "rejected"}]}
  good = [{"prompt": f"Name prime {i}.", "chosen": "11.", "rejected": "12."} for i in range(8)]
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in good + [same, sharegpt_same]))
  config = data_config(source="files", train_files=str(path), eval_files=str(path))
  with pytest.raises(RecordError, match=f"{path}:9: 'chosen' and 'rejected' are the same text"):
    preferences.load_examples(config, "preferences", "eval")
  config.skip_invalid = True
  examples, counter = preferences.load_examples(config, "preferences", "eval")
  assert len(examples) == 8 and dict(counter.reasons) == {"same_answer": 2}
  # 2 of 10 records is above the 10% share: the file is named in a warning of its own.
  assert f"{path}: skipped 2 of 10 records (20%) {{'same_answer': 2}}" in warnings


def test_reference_table_must_match_the_examples(tiny_tokenizer, tmp_path):
  with pytest.raises(ValueError, match="reference table has 3 rows for 12"):
    _batches(data_config(), tiny_tokenizer, str(tmp_path), reference=np.zeros((3, 2)))
  table = np.arange(24, dtype=np.float32).reshape(12, 2)
  batch = _batches(data_config(), tiny_tokenizer, str(tmp_path), reference=table)[0]
  ids, sides = batch["example_ids"], batch["sides"]
  real = sides > 0
  np.testing.assert_array_equal(batch["reference_logps"][real],
                                table[ids[real], sides[real] - 1])

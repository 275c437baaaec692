"""The source layer: one dispatch on config.data.source for every kind of record."""

import json
import logging
import os

import pytest

from configs import base
from data import records
from data import sources
from data import tiny_tasks
from data.conversation import Feedback, PreferencePair, Prompt, Turn


def data_config(**overrides):
  config = base.base_config().data
  config.update(dict(tiny_world_train_docs=40, tiny_world_eval_docs=10, tiny_task="alpaca",
                     tiny_task_train_records=24, tiny_task_eval_records=8, format="auto",
                     tiny_prompts="unseen", pairs_eval_files=""))
  config.update(overrides)
  return config


def test_errors_name_the_config_key():
  with pytest.raises(ValueError, match="unknown config.data.source 'hub'"):
    sources.load_records(data_config(source="hub"), "texts", "train")
  with pytest.raises(ValueError, match="config.data.source 'tfds' does not serve preferences"):
    sources.load_records(data_config(source="tfds"), "preferences", "train")
  with pytest.raises(ValueError, match="unknown record kind 'images'"):
    sources.load_records(data_config(), "images", "train")
  with pytest.raises(ValueError, match="split must be one of"):
    sources.load_records(data_config(), "texts", "test")
  with pytest.raises(ValueError, match="split must be one of"):
    sources.load_records(data_config(), "texts", "pairs_eval")  # preference pairs only
  with pytest.raises(ValueError, match="writes its prompts records into the run's workdir"):
    sources.load_records(data_config(), "prompts", "train")
  with pytest.raises(ValueError, match="config.data.eval_files is empty"):
    sources.load_records(data_config(source="files"), "conversations", "eval")
  with pytest.raises(ValueError, match="config.data.pairs_eval_files is empty"):
    sources.record_files(data_config(source="files"), "preferences", "pairs_eval", None)
  with pytest.raises(ValueError, match="config.data.tiny_task must be one of"):
    sources.load_records(data_config(tiny_task="prompt"), "conversations", "train")
  with pytest.raises(ValueError, match="config.data.tiny_task: unknown 'mixed'"):
    sources.record_files(data_config(tiny_task="mixed"), "preferences", "train", "/tmp")
  with pytest.raises(ValueError, match="config.data.tiny_prompts: unknown 'all'"):
    sources.record_files(data_config(tiny_prompts="all"), "prompts", "train", "/tmp")


@pytest.mark.parametrize("kind, tiny_task, record_type, count", [
    ("texts", "alpaca", str, 40),
    ("conversations", "alpaca", tuple, 24),
    ("preferences", "prompt", PreferencePair, 24),
    ("preferences", "sharegpt", PreferencePair, 48),  # two pairs per conversation
    ("feedback", "prompt", Feedback, 24),
    ("prompts", "alpaca", Prompt, None),             # 'unseen': about half of 32 questions
])
def test_tiny_world_files_read_back_as_files(tmp_path, kind, tiny_task, record_type, count):
  config = data_config(tiny_task=tiny_task)
  got = sources.load_records(config, kind, "train", str(tmp_path))
  assert all(isinstance(r, record_type) for r in got)
  assert len(got) == count if count else 0 < len(got) < 32
  parts = sources.record_files(config, kind, "train", str(tmp_path))
  assert all(os.path.dirname(p) == str(tmp_path / "data") for p in parts)
  # The same files through source 'files' give the same records.
  as_files = data_config(source="files", train_files=",".join(parts))
  assert sources.load_records(as_files, kind, "train") == got


def test_tiny_world_file_names_and_in_memory_records(tmp_path):
  config = data_config(tiny_task="mixed")
  on_disk = sources.load_records(config, "conversations", "eval", str(tmp_path))
  # Without a workdir: generated in memory, the same records, Alpaca and ShareGPT interleaved.
  assert sources.load_records(config, "conversations", "eval") == on_disk
  assert [len(c) == 2 for c in on_disk[:4]] == [True, False, True, False]
  sources.load_records(config, "texts", "eval", str(tmp_path))
  for prompt_set in ("unseen", "sft"):
    sources.load_records(data_config(tiny_prompts=prompt_set), "prompts", "eval", str(tmp_path))
  assert sorted(os.listdir(tmp_path / "data")) == [
      "tiny_alpaca-train.jsonl", "tiny_alpaca-validation.jsonl",
      "tiny_prompts-train.jsonl", "tiny_prompts-validation.jsonl",
      "tiny_prompts_unseen-eval.jsonl", "tiny_prompts_unseen-train.jsonl",
      "tiny_sharegpt-train.jsonl", "tiny_sharegpt-validation.jsonl",
      "tiny_world-train.jsonl", "tiny_world-validation.jsonl"]


def test_unseen_prompts_split_questions_no_stage_trained_on(tmp_path):
  config = data_config()
  train, held_out = (sources.load_records(config, "prompts", split, str(tmp_path), seed=1)
                     for split in ("train", "eval"))
  every = [Prompt((Turn("user", r["prompt"]),), r["answer"])
           for r in tiny_tasks.prompt_records("validation", 32, seed=1)]
  assert sorted(map(repr, train + held_out)) == sorted(map(repr, every))
  assert not {p.context for p in train} & {p.context for p in held_out}
  # 'sft': the SFT questions to train on, the validation questions held out.
  sft = sources.load_records(data_config(tiny_prompts="sft"), "prompts", "train", str(tmp_path),
                             seed=1)
  assert [p.answer for p in sft] == [r["answer"] for r in tiny_tasks.prompt_records(
      "train", 24, seed=1)]


def test_pairs_eval_are_held_out_preference_pairs(tmp_path):
  config = data_config(tiny_task="prompt")
  pairs = sources.load_records(config, "preferences", "pairs_eval", str(tmp_path))
  assert pairs == sources.load_records(config, "preferences", "eval", str(tmp_path))
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"prompt": "2+2?", "chosen": "4.", "rejected": "5."}) + "\n")
  files = data_config(source="files", pairs_eval_files=str(path))
  assert sources.load_records(files, "preferences", "pairs_eval") == [
      PreferencePair((Turn("user", "2+2?"),), "4.", "5.")]


def test_bad_records_are_counted_logged_and_parts_interleaved(tmp_path, caplog):
  first, second = tmp_path / "a.jsonl", tmp_path / "b.txt"
  first.write_text("".join(json.dumps(r) + "\n" for r in (
      {"text": "one"}, {"txt": "bad"}, {"text": "three"}, {"text": "four"})))
  second.write_text("alpha\n\nbeta\n")
  with pytest.raises(records.RecordError, match=f"{first}:2: missing field 'text'"):
    sources.read_files([str(first), str(second)], "texts")
  counter = records.SkipCounter()
  with caplog.at_level(logging.WARNING):
    texts = sources.read_files([str(first), str(second)], "texts", skip_invalid=True,
                               counter=counter)
  assert texts == ["one", "alpha", "three", "beta", "four"]
  assert (counter.skipped, dict(counter.reasons)) == (1, {"missing_field": 1})
  assert any("skipped 1 invalid records" in r.getMessage() for r in caplog.records)

"""Replay mixing: exact proportions, determinism, sharding, resumable batches, bad records."""

import json

import grain
import numpy as np
import pytest

from configs import base
from data import records
from data.chain import mix_datasets
from data.mixture import make_mixed_clm_dataset, mixed_texts, replay_data_config
from data.pipeline import load_texts


def data_config(**overrides):
  config = base.base_config().data
  config.update(dict(tiny_world_domain="chronicle", tiny_world_train_docs=300,
                     tiny_world_eval_docs=20, replay_source="tiny_world",
                     replay_tiny_world_domain="world", replay_weight=0.25))
  config.update(overrides)
  return config


def test_replay_data_config():
  assert replay_data_config(data_config(replay_source="")) is None
  replay = replay_data_config(data_config(replay_train_files="a.jsonl", replay_eval_files="b"))
  assert (replay.source, replay.tiny_world_domain) == ("tiny_world", "world")
  assert (replay.train_files, replay.eval_files) == ("a.jsonl", "b")
  assert replay.seq_len == data_config().seq_len  # everything else is shared


def test_mix_datasets_proportions_by_hand():
  a = grain.MapDataset.range(0, 1000).repeat(None)
  b = grain.MapDataset.range(1000, 2000).repeat(None)
  mixed = mix_datasets([a, b], [0.75, 0.25])
  first = [mixed[i] for i in range(400)]
  # Exactly 3 of every 4 from the first dataset, each in its own order.
  assert sum(x >= 1000 for x in first) == 100
  assert [x for x in first if x < 1000] == list(range(300))
  assert [x for x in first if x >= 1000] == list(range(1000, 1100))
  assert [mixed[i] for i in range(8)] == [0, 1, 2, 1000, 3, 4, 5, 1001]
  with pytest.raises(ValueError, match="> 0"):
    mix_datasets([a, b], [1.0, 0.0])


def test_mixed_texts_share_determinism_and_sharding():
  config = data_config()
  main = set(load_texts(config, "train"))
  replay = set(load_texts(replay_data_config(config), "train"))
  assert not main & replay
  mixed = mixed_texts(config, split="train", seed=1)
  texts = [mixed[i] for i in range(800)]
  assert sum(t in replay for t in texts) == 200 and all(t in main | replay for t in texts)
  assert texts == [mixed_texts(config, split="train", seed=1)[i] for i in range(800)]
  assert texts != [mixed_texts(config, split="train", seed=2)[i] for i in range(800)]
  with pytest.raises(ValueError, match="replay_weight"):
    mixed_texts(data_config(replay_weight=0.0), split="train")


def test_batches_resume(tiny_tokenizer):
  make = lambda: iter(make_mixed_clm_dataset(data_config(), tiny_tokenizer, split="train",
                                             seq_len=64, batch_size=4, seed=0))
  it = make()
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for expected in want:
    got = next(resumed)
    assert got["inputs"].shape == (4, 64)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_bad_replay_record_names_file_and_line(tmp_path, tiny_tokenizer):
  main, replay = tmp_path / "main.jsonl", tmp_path / "replay.jsonl"
  main.write_text("".join(json.dumps({"text": f"Ledger {i}: salt, copper."}) + "\n"
                          for i in range(4)))
  replay.write_text(json.dumps({"text": "Ashford trades salt."}) + "\n" + '{"txt": 1}\n')
  files = dict(source="files", train_files=str(main), replay_source="files",
               replay_train_files=str(replay), replay_weight=0.5)
  with pytest.raises(records.RecordError, match=f"{replay}:2: missing field 'text'"):
    mixed_texts(data_config(**files), split="train")
  mixed = mixed_texts(data_config(**files, skip_invalid=True, shuffle=False), split="train")
  assert [mixed[i] for i in range(4)] == ["Ledger 0: salt, copper.", "Ashford trades salt.",
                                          "Ledger 1: salt, copper.", "Ashford trades salt."]

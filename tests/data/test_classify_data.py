"""Labelled records in the public formats (IMDb, SST-2, MNLI, STS-B) as written by the tests,
bad labels (errors with file:line, or skipped and counted), the encoder / decoder framing of
texts and pairs, truncation, packed batches and the tiny world's task."""

import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import classify as classify_config
from data import sources
from data.classify import (TINY_LABEL_NAMES, EncodeLabelled, LabelSpec, Labelled,
                           goods_records, make_classify_dataset, truncate_pair)
from data.records import RecordError, SkipCounter
from data.world import build_world


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _data(**fields):
  config = classify_config.get_config("tiny").data
  config.update({"source": "files", "label_names": "", **fields})
  return config


def _load(data, labels, split="train"):
  counter = SkipCounter()
  return sources.load_records(data, "labelled", split, counter=counter, labels=labels), counter


def test_public_formats_read_as_they_are(tmp_path):
  imdb = _write(tmp_path / "imdb.jsonl", [{"text": "A warm film.", "label": 1},
                                          {"text": "Dull.", "label": 0}])
  got, _ = _load(_data(train_files=imdb), LabelSpec(2))
  assert got == [Labelled("A warm film.", None, 1), Labelled("Dull.", None, 0)]
  sst2 = _write(tmp_path / "sst2.jsonl", [{"sentence": "it 's a charming journey .",
                                           "label": 1, "idx": 0}])
  got, _ = _load(_data(train_files=sst2, text_field="sentence"), LabelSpec(2))
  assert got == [Labelled("it 's a charming journey .", None, 1)]
  mnli = _write(tmp_path / "mnli.jsonl", [
      {"premise": "A man eats.", "hypothesis": "Someone eats.", "label": 0},
      {"premise": "A man eats.", "hypothesis": "Nobody eats.", "label": "contradiction"}])
  data = _data(train_files=mnli, text_field="premise", text_pair_field="hypothesis",
               label_names="entailment,neutral,contradiction")
  got, _ = _load(data, LabelSpec.from_config(data, 3, "classification"))
  assert got == [Labelled("A man eats.", "Someone eats.", 0),
                 Labelled("A man eats.", "Nobody eats.", 2)]
  stsb = _write(tmp_path / "stsb.jsonl", [{"sentence1": "A plane takes off.",
                                           "sentence2": "An air plane is taking off.",
                                           "label": 5.0}, {"sentence1": "a", "sentence2": "b",
                                                           "label": 3}])
  data = _data(train_files=stsb, text_field="sentence1", text_pair_field="sentence2")
  got, _ = _load(data, LabelSpec.from_config(data, 1, "regression"))
  assert [e.label for e in got] == [5.0, 3.0] and got[0].text_b.startswith("An air")


class _ImdbLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds `imdb_reviews`' features: `text` (Text) and `label` (ClassLabel neg / pos)."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def __init__(self, rows, **kwargs):
    self.name = "imdb_like"
    self._rows = rows
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
        tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                    "label": tfds.features.ClassLabel(names=["neg", "pos"])})))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    yield from enumerate(self._rows)


def test_tfds_imdb_reviews_shape(tmp_path):
  rows = [{"text": "A warm, funny film.", "label": 1}, {"text": "Dull and long.", "label": 0}]
  _ImdbLike(rows, data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  data = _data(source="tfds", tfds_name="imdb_like", tfds_data_dir=str(tmp_path),
               eval_split="test", label_names="negative,positive")
  got, _ = _load(data, LabelSpec.from_config(data, 2, "classification"), split="eval")
  assert got == [Labelled("A warm, funny film.", None, 1), Labelled("Dull and long.", None, 0)]


def test_bad_labels_name_file_and_line_or_are_skipped_and_counted(tmp_path):
  records = [{"text": "ok", "label": "neutral"}, {"text": "far", "label": 3},
             {"text": "test row", "label": -1}, {"text": "odd", "label": "maybe"},
             {"text": "none"}, {"text": "flag", "label": True}, {"text": "fine", "label": 2}]
  path = _write(tmp_path / "bad.jsonl", records)
  data = _data(train_files=path, label_names="entailment,neutral,contradiction")
  labels = LabelSpec.from_config(data, 3, "classification")
  with pytest.raises(RecordError, match=r"bad\.jsonl:2: label 3 is not an int in \[0, 3\)"):
    _load(data, labels)
  data.skip_invalid = True
  got, counter = _load(data, labels)
  assert [e.label for e in got] == [1, 2]
  assert counter.skipped == 5 and dict(counter.reasons) == {
      "bad_label": 3, "unknown_label": 1, "missing_label": 1}


def test_label_settings_must_agree():
  data = _data(label_names="a,b")
  with pytest.raises(ValueError, match="label_names has 2 names"):
    LabelSpec.from_config(data, 3, "classification")
  with pytest.raises(ValueError, match="num_labels must be 1 for regression"):
    LabelSpec.from_config(_data(), 2, "regression")


def test_truncation_cuts_the_longer_text_first():
  assert truncate_pair([1, 2, 3, 4, 5], [6, 7], 5) == ([1, 2, 3], [6, 7])
  assert truncate_pair([1, 2, 3], [4, 5, 6], 4) == ([1, 2], [4, 5])
  assert truncate_pair([1, 2, 3], [], 2) == ([1, 2], [])


def test_encoder_and_decoder_framing(tiny_tokenizer):
  tok = tiny_tokenizer
  example = Labelled("Ada sells wool.", "Bran buys it.", 1)
  a, b = tok.encode(example.text), tok.encode(example.text_b)
  enc = EncodeLabelled([example], tok, body="encoder", seq_len=64, regression=False)
  (segment,) = enc(0)
  # No [CLS] / [SEP] pieces in this tokenizer: BOS and EOS stand in for them.
  assert segment["inputs"].tolist() == [tok.bos_id, *a, tok.eos_id, *b, tok.eos_id]
  assert segment["token_type_ids"].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
  assert segment["loss_mask"].tolist() == [1.0] + [0.0] * (len(a) + len(b) + 2)
  assert set(segment["labels"].tolist()) == {1} and set(segment["example_ids"]) == {0}
  dec = EncodeLabelled([example], tok, body="decoder", seq_len=64, regression=False,
                       separator=" |")
  (segment,) = dec(0)
  sep = tok.encode(" |")
  assert segment["inputs"].tolist() == [tok.bos_id, *a, *sep, *b, tok.eos_id]
  assert segment["loss_mask"][-1] == 1.0 and segment["loss_mask"].sum() == 1.0
  assert "token_type_ids" not in segment
  short = EncodeLabelled([example], tok, body="encoder", seq_len=8, regression=False)
  assert len(short(0)[0]["inputs"]) == 8


def test_a_tokenizer_that_pads_with_eos_refuses_a_trailing_eos(tiny_tokenizer):
  class PadsWithEos:
    eos_id = pad_id = 3
  with pytest.raises(ValueError, match="add_eos"):
    EncodeLabelled([], PadsWithEos(), body="decoder", seq_len=8, regression=False)


@pytest.mark.parametrize("body", ["encoder", "decoder"])
def test_packed_eval_batches_hold_each_example_once(tiny_tokenizer, body):
  examples = [Labelled(f"Ada sold {i} sacks of salt.", None, i % 3) for i in range(23)]
  data = _data(seq_len=48)
  rows = []
  for batch in make_classify_dataset(data, tiny_tokenizer, examples, body=body,
                                     regression=False, split="eval", batch_size=4):
    assert batch["inputs"].shape == (4, 48)
    rows += [{k: v[r] for k, v in batch.items()} for r in range(4)]
  seen = []
  for row in rows:
    for segment in range(1, row["segment_ids"].max() + 1):
      where = np.flatnonzero(row["segment_ids"] == segment)
      pooled = where[0] if body == "encoder" else where[-1]
      assert np.flatnonzero(row["loss_mask"]).tolist().count(pooled) == 1
      assert row["loss_mask"][where].sum() == 1.0
      ids = set(row["example_ids"][where].tolist())
      assert len(ids) == 1 and set(row["labels"][where].tolist()) == {ids.pop() % 3}
      seen.append(int(row["example_ids"][where[0]]))
  assert sorted(seen) == list(range(23))
  assert max(r["segment_ids"].max() for r in rows) > 1   # rows are packed


def test_tiny_world_task(tmp_path):
  train, held_out = list(goods_records("train", 500)), list(goods_records("validation", 64))
  assert {r["label"] for r in train} == set(TINY_LABEL_NAMES)
  assert len({r["text"] for r in held_out}) == 64
  assert not {r["text"] for r in held_out} & {r["text"] for r in goods_records("train", 4000)}
  trades = {g.name: g.trade for g in build_world().goods}
  for r in train + held_out:   # named by the good or by its maker's trade, and only that one
    words = set(re.findall(r"[a-z]+", r["text"].lower()))
    assert r["label"] in words or trades[r["label"]] in words, r
  assert any(r["label"] not in r["text"] for r in held_out)   # some need the world's facts
  config = classify_config.get_config("tiny")
  assert config.data.label_names == ",".join(TINY_LABEL_NAMES)
  config.data.tiny_task_train_records, config.data.tiny_task_eval_records = 500, 64
  labels = LabelSpec.from_config(config.data, config.model.num_labels, "classification")
  got = sources.load_records(config.data, "labelled", "eval", str(tmp_path), labels=labels)
  assert [TINY_LABEL_NAMES[e.label] for e in got] == [r["label"] for r in held_out]
  assert (tmp_path / "data" / "tiny_goods-validation.jsonl").exists()

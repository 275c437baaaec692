"""tfds datasets of local files, written as array_record and read back by index (no TF)."""

import json

import numpy as np

from data import pipeline
from data import tfds_builder
from tests.data.test_pipeline import _config, _segment_texts

TRAIN = ["Ashford lies in the forest.", "Greywick makes copper.", "Zoe is 40 years old.",
         "Café — ünïcode survives."]


def _build(tmp_path, overwrite=False):
  (tmp_path / "in").mkdir(exist_ok=True)
  (tmp_path / "in" / "train.jsonl").write_text(
      "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TRAIN),
      encoding="utf-8")
  (tmp_path / "in" / "eval.txt").write_text("held out one\n\nheld out two\n")
  return tfds_builder.build_text_dataset(
      "local_text", str(tmp_path / "in" / "train.jsonl"), str(tmp_path / "in" / "eval.txt"),
      str(tmp_path / "tfds"), overwrite=overwrite)


def test_build_and_read_by_index(tmp_path):
  builder = _build(tmp_path)
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["validation"].num_examples == 2
  files = sorted(p.name for p in (tmp_path / "tfds" / "local_text" / "1.0.0").iterdir())
  assert "local_text-train.array_record-00000-of-00001" in files

  train = tfds_builder.open_tfds_source("local_text", str(tmp_path / "tfds"), "train")
  assert len(train) == 4
  assert [train[i] for i in (3, 0, 2, 1)] == [TRAIN[3], TRAIN[0], TRAIN[2], TRAIN[1]]
  assert train.__getitems__([1, 3]) == [TRAIN[1], TRAIN[3]]
  held_out = tfds_builder.open_tfds_source("local_text:1.0.0", str(tmp_path / "tfds"),
                                           "validation")
  assert [held_out[0], held_out[1]] == ["held out one", "held out two"]
  assert tfds_builder.open_tfds_source("local_text", str(tmp_path / "tfds"),
                                       "train[1:3]")[0] == TRAIN[1]


def test_prepared_dataset_is_reused_unless_overwritten(tmp_path):
  _build(tmp_path)
  record = tmp_path / "tfds" / "local_text" / "1.0.0" / (
      "local_text-train.array_record-00000-of-00001")
  mtime = record.stat().st_mtime_ns
  _build(tmp_path)
  assert record.stat().st_mtime_ns == mtime
  (tmp_path / "in" / "train.jsonl").write_text('{"text": "only one"}\n')
  builder = tfds_builder.build_text_dataset(
      "local_text", str(tmp_path / "in" / "train.jsonl"), "", str(tmp_path / "tfds"),
      overwrite=True)
  assert builder.info.splits["train"].num_examples == 1
  assert tfds_builder.open_tfds_source("local_text", str(tmp_path / "tfds"), "train")[0] == (
      "only one")


def test_pipeline_reads_tfds(tmp_path, tiny_tokenizer):
  _build(tmp_path)
  cfg = _config(source="tfds", tfds_name="local_text", tfds_data_dir=str(tmp_path / "tfds"),
                shuffle=False)
  it = pipeline.make_clm_iterator(cfg, tiny_tokenizer, split="train", seq_len=64,
                                  batch_size=2, num_epochs=1)
  batches = list(it)
  assert _segment_texts(batches, tiny_tokenizer) == TRAIN
  eval_batches = list(pipeline.make_clm_dataset(cfg, tiny_tokenizer, split="eval", seq_len=64,
                                                batch_size=2))
  assert _segment_texts(eval_batches, tiny_tokenizer) == ["held out one", "held out two"]
  # Both short documents share the first row; the second row of the one batch is padding.
  assert len(eval_batches) == 1
  np.testing.assert_array_equal(eval_batches[0]["segment_ids"].max(axis=1), [2, 0])

"""The CLM grain pipeline: shapes, sharding, resumption, determinism, tokenizer, entropy."""

import collections
import json
import math
import os

import numpy as np
import pytest

from configs import base
from data import packing
from data import pipeline
from data import tiny_world
from tests.data.conftest import TEST_VOCAB_SIZE


def _config(**overrides):
  cfg = base.base_config().data
  cfg.tiny_world_train_docs = 120
  cfg.tiny_world_eval_docs = 30
  cfg.pack_bins = 4
  cfg.update(overrides)
  return cfg


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _segment_texts(batches, tok):
  """The text of every segment (a whole document when none is split)."""
  texts = []
  for batch in batches:
    for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
      texts.extend(tok.decode(inputs[seg == s]) for s in range(1, seg.max() + 1))
  return texts


def test_batch_shapes_and_contents(tiny_tokenizer):
  # Rows of 256 hold whole tiny-world documents: every segment is BOS ... EOS.
  it = pipeline.make_clm_iterator(_config(), tiny_tokenizer, split="train", seq_len=256,
                                  batch_size=4, seed=0)
  for batch in _batches(it, 5):
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "inputs": ((4, 256), "int32"), "targets": ((4, 256), "int32"),
        "segment_ids": ((4, 256), "int32"), "positions": ((4, 256), "int32"),
        "loss_mask": ((4, 256), "float32")}
    seg = batch["segment_ids"]
    np.testing.assert_array_equal(batch["loss_mask"], seg > 0)
    # Within a segment the next input is this target; positions count from 0.
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    np.testing.assert_array_equal(batch["inputs"][:, 1:][same], batch["targets"][:, :-1][same])
    np.testing.assert_array_equal(batch["positions"][:, 1:][same],
                                  batch["positions"][:, :-1][same] + 1)
    starts = (batch["positions"] == 0) & (seg > 0)
    ends = (seg > 0) & ~np.pad(same, ((0, 0), (0, 1)))
    assert (batch["inputs"][starts] == tiny_tokenizer.bos_id).all()
    assert (batch["targets"][ends] == tiny_tokenizer.eos_id).all()
    assert starts.sum() == ends.sum() >= 4  # at least a document per row
    assert tiny_tokenizer.bos_id not in batch["targets"]


def test_shards_are_disjoint_and_cover_the_data(tiny_tokenizer):
  cfg = _config()
  docs = tiny_world.generate_documents("train", 120)
  shards = []
  for index in range(2):
    it = pipeline.make_clm_iterator(cfg, tiny_tokenizer, split="train", seq_len=256,
                                    batch_size=4, shard_index=index, shard_count=2, seed=3,
                                    num_epochs=1)
    shards.append(_segment_texts(list(it), tiny_tokenizer))
  assert len(shards[0]) == len(shards[1]) == 60
  assert collections.Counter(shards[0]) + collections.Counter(shards[1]) == (
      collections.Counter(docs))
  assert shards[0] != docs[:60]  # shuffled


def test_same_seed_same_order(tiny_tokenizer):
  def first(seed):
    it = pipeline.make_clm_iterator(_config(), tiny_tokenizer, split="train", seq_len=64,
                                    batch_size=4, seed=seed)
    return _batches(it, 3)
  a, b, c = first(0), first(0), first(1)
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_epochs_are_reshuffled(tiny_tokenizer):
  it = pipeline.make_clm_iterator(_config(), tiny_tokenizer, split="train", seq_len=256,
                                  batch_size=4, seed=0, num_epochs=2)
  texts = _segment_texts(list(it), tiny_tokenizer)
  assert len(texts) == 240
  assert sorted(texts[:120]) == sorted(texts[120:]) and texts[:120] != texts[120:]


def test_resume_yields_the_same_batches(tiny_tokenizer):
  # Rows of 48 split long documents, so states fall mid-document and mid-window.
  cfg = _config(tiny_world_train_docs=40)
  make = lambda: pipeline.make_clm_iterator(cfg, tiny_tokenizer, split="train", seq_len=48,
                                            batch_size=3, shard_index=1, shard_count=2,
                                            seed=5)
  it = make()
  states, batches = [], []
  for _ in range(40):  # several epochs of the 20-document shard
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  packed = [s for s in json.dumps(states).split('"chunk": ')[1:]]
  assert any(not p.startswith("0") for p in packed), "no state fell inside a document"
  for step in (0, 1, 6, 13, 22, 35):
    resumed = make()
    resumed.set_state(states[step])
    for want in batches[step:step + 5]:
      got = next(resumed)
      for key in packing.ROW_KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{step} {key}")


def test_eval_is_fixed_finite_and_complete(tiny_tokenizer):
  cfg = _config()
  ds = pipeline.make_clm_dataset(cfg, tiny_tokenizer, split="eval", seq_len=64, batch_size=4)
  first, second = list(ds), list(ds)
  assert len(first) == len(second) > 0
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["targets"], b["targets"])
  docs = tiny_world.generate_documents("validation", 30)
  tokens = tiny_tokenizer.encode_batch(docs, add_bos=True, add_eos=True)
  assert sum(b["loss_mask"].sum() for b in first) == sum(len(t) - 1 for t in tokens)
  assert first[-1]["inputs"].shape == (4, 64)


def test_files_source(tmp_path, tiny_tokenizer):
  lines = [json.dumps({"body": f"Document number {i} is about Ashford."}) for i in range(9)]
  (tmp_path / "train.jsonl").write_text("\n".join(lines + ["{oops"]) + "\n")
  cfg = _config(source="files", train_files=str(tmp_path / "*.jsonl"), text_field="body",
                skip_invalid=True, shuffle=False)
  it = pipeline.make_clm_iterator(cfg, tiny_tokenizer, split="train", seq_len=64,
                                  batch_size=2, num_epochs=1)
  texts = _segment_texts(list(it), tiny_tokenizer)
  assert texts == [f"Document number {i} is about Ashford." for i in range(9)]
  with pytest.raises(ValueError, match="eval_files is empty"):
    pipeline.make_clm_iterator(cfg, tiny_tokenizer, split="eval", seq_len=64, batch_size=2)


def test_resolve_tokenizer_trains_once(tmp_path, tiny_tokenizer_path):
  cfg = _config(tokenizer_vocab_size=352)
  tok = pipeline.resolve_tokenizer(cfg, str(tmp_path))
  path = tmp_path / "tokenizer" / "spm.model"
  assert tok.vocab_size == 352 and path.exists()
  assert sorted(os.listdir(tmp_path / "data")) == ["tiny_world-train.jsonl",
                                                   "tiny_world-validation.jsonl"]
  mtime = path.stat().st_mtime_ns
  assert pipeline.resolve_tokenizer(cfg, str(tmp_path)).vocab_size == 352
  assert path.stat().st_mtime_ns == mtime
  with pytest.raises(ValueError, match="delete it to retrain"):
    pipeline.resolve_tokenizer(_config(tokenizer_vocab_size=400), str(tmp_path))
  given = pipeline.resolve_tokenizer(_config(tokenizer=tiny_tokenizer_path), str(tmp_path))
  assert given.vocab_size == TEST_VOCAB_SIZE
  # The workdir's files hold the same documents as the in-memory corpus.
  assert pipeline.load_texts(cfg, "eval", str(tmp_path)) == list(
      pipeline.load_texts(cfg, "eval"))


def test_unigram_entropy():
  # p = (1/2, 1/4, 1/4): H = 1.5 ln 2.
  assert pipeline.unigram_entropy([[1, 1], [2, 3]]) == pytest.approx(1.5 * math.log(2))
  assert pipeline.unigram_entropy([np.array([7, 7, 7])]) == 0.0
  assert pipeline.unigram_entropy([[0, 1, 2, 3]]) == pytest.approx(math.log(4))
  with pytest.raises(ValueError):
    pipeline.unigram_entropy([[]])


def test_bad_arguments(tiny_tokenizer):
  with pytest.raises(ValueError, match="split"):
    pipeline.make_clm_iterator(_config(), tiny_tokenizer, split="test", seq_len=8,
                               batch_size=1)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_clm_iterator(_config(), tiny_tokenizer, split="train", seq_len=8,
                               batch_size=1, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="source"):
    pipeline.load_texts(_config(source="hub"), "train")

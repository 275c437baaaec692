"""BERT 80/10/10 masking: the rule by hand, its statistics, determinism, sharding, batches."""

import json

import numpy as np
import pytest

from configs import base
from data import records
from data.mlm_masking import (MaskDocument, MaskingRule, make_mlm_dataset, mask_token_id,
                              masked_documents, special_token_ids)
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def data_config(**overrides):
  config = base.base_config().data
  config.update(dict(tiny_world_train_docs=200, tiny_world_eval_docs=20, shuffle=True))
  config.update(overrides)
  return config


def rule(vocab_size=64, **rates):
  return MaskingRule(mask_id=10, special_ids=tuple(range(11)), vocab_size=vocab_size, **rates)


def test_mask_symbol_is_reserved(tiny_tokenizer):
  assert mask_token_id(tiny_tokenizer) == 10
  assert special_token_ids(tiny_tokenizer) == tuple(range(11))
  assert tiny_tokenizer.encode("a <|mask|> b").count(10) == 1


def test_tokenizer_without_mask_symbol_is_an_error():
  class NoMask:  # what token_to_id answers for a piece the model lacks: the unk id
    unk_id = 1
    token_to_id = staticmethod(lambda piece: 1)
  with pytest.raises(ValueError, match="none of the mask pieces"):
    mask_token_id(NoMask())


def test_bert_and_roberta_mask_pieces_of_converted_tokenizers():
  def vocab_tokenizer(vocab):  # an HF tokenizer.json's answers: the unk id for other pieces
    class Tok:
      unk_id = vocab.get("[UNK]", -1)
      token_to_id = staticmethod(lambda piece: vocab.get(piece, Tok.unk_id))
    return Tok
  assert mask_token_id(vocab_tokenizer({"[PAD]": 0, "[UNK]": 100, "[MASK]": 103})) == 103
  assert mask_token_id(vocab_tokenizer({"<s>": 0, "<mask>": 50264})) == 50264


def test_rule_by_hand():
  tokens = np.array([BOS_ID, 20, 21, 22, EOS_ID], np.int32)
  rng = lambda: np.random.default_rng(0)
  inputs, mask = rule(mask_rate=1.0, mask_token_rate=1.0, random_token_rate=0.0).apply(
      tokens, rng())
  np.testing.assert_array_equal(inputs, [BOS_ID, 10, 10, 10, EOS_ID])
  np.testing.assert_array_equal(mask, [0, 1, 1, 1, 0])
  # All selected, all kept: inputs unchanged, still predicted.
  inputs, mask = rule(mask_rate=1.0, mask_token_rate=0.0, random_token_rate=0.0).apply(
      tokens, rng())
  np.testing.assert_array_equal(inputs, tokens)
  np.testing.assert_array_equal(mask, [0, 1, 1, 1, 0])
  # All replaced by random tokens: never a special id.
  inputs, _ = rule(mask_rate=1.0, mask_token_rate=0.0, random_token_rate=1.0).apply(
      tokens, rng())
  assert inputs[0] == BOS_ID and inputs[-1] == EOS_ID and np.all(inputs[1:4] >= 11)
  # mask_rate 0: nothing selected.
  inputs, mask = rule(mask_rate=0.0).apply(tokens, rng())
  np.testing.assert_array_equal(inputs, tokens)
  assert mask.sum() == 0


@pytest.mark.parametrize("candidates, selected", [(0, 0), (3, 1), (7, 1), (10, 2), (20, 3),
                                                  (100, 15)])
def test_selected_count_is_bert_rounding(candidates, selected):
  # max(1, round(0.15 * n)) of the maskable tokens; specials around them never count.
  tokens = np.array([BOS_ID] + [30 + i % 20 for i in range(candidates)] + [EOS_ID, PAD_ID])
  _, mask = rule().apply(tokens, np.random.default_rng(1))
  assert mask.sum() == selected
  assert mask[0] == mask[-1] == mask[-2] == 0


def test_80_10_10_statistics():
  r = rule(vocab_size=384)
  rng = np.random.default_rng(2)
  counts = dict(mask=0, random=0, kept=0)
  for _ in range(2000):
    tokens = np.concatenate([[BOS_ID], rng.integers(11, 384, 40), [EOS_ID]]).astype(np.int32)
    inputs, mask = r.apply(tokens, rng)
    assert mask.sum() == 6
    sel = mask > 0
    assert np.all(inputs[~sel] == tokens[~sel])
    counts["mask"] += int((inputs[sel] == 10).sum())
    counts["kept"] += int((inputs[sel] == tokens[sel]).sum())
    changed = inputs[sel][(inputs[sel] != 10) & (inputs[sel] != tokens[sel])]
    counts["random"] += len(changed)
    assert np.all(changed >= 11)
  total = sum(counts.values())
  assert total == 12_000
  assert abs(counts["mask"] / total - 0.8) < 0.02
  assert abs(counts["random"] / total - 0.1) < 0.015
  assert abs(counts["kept"] / total - 0.1) < 0.015


def test_bad_rates():
  with pytest.raises(ValueError, match="mask_rate"):
    rule(mask_rate=1.5)
  with pytest.raises(ValueError, match="sum <= 1"):
    rule(mask_token_rate=0.8, random_token_rate=0.3)


def test_deterministic_per_seed_and_index(tiny_tokenizer):
  r = MaskingRule.for_tokenizer(tiny_tokenizer)
  text = "Ashford lies in the hills and trades salt for copper every spring market day."
  masked = lambda seed, index: MaskDocument(tiny_tokenizer, r, seed, True, True)((index, text))
  a, b = masked(3, 5), masked(3, 5)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["loss_mask"], masked(3, 6)["loss_mask"])
  assert not np.array_equal(a["loss_mask"], masked(4, 5)["loss_mask"])
  np.testing.assert_array_equal(a["targets"], tiny_tokenizer.encode(text, True, True))


def test_shards_mask_like_one_host_and_epochs_remask(tiny_tokenizer):
  r = MaskingRule.for_tokenizer(tiny_tokenizer)
  kw = dict(split="train", seed=7, num_epochs=2)
  one = masked_documents(data_config(), tiny_tokenizer, r, **kw)
  shards = [masked_documents(data_config(), tiny_tokenizer, r, shard_index=k, shard_count=2,
                             **kw) for k in range(2)]
  for j in range(4):
    for k in range(2):
      for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(shards[k][j][key], one[2 * j + k][key])
  # Unshuffled, the second epoch repeats the documents with fresh masks (dynamic masking).
  flat = masked_documents(data_config(shuffle=False), tiny_tokenizer, r, **kw)
  np.testing.assert_array_equal(flat[3]["targets"], flat[203]["targets"])
  assert not np.array_equal(flat[3]["inputs"], flat[203]["inputs"])


def test_batches_and_resume(tiny_tokenizer):
  r = MaskingRule.for_tokenizer(tiny_tokenizer)
  make = lambda: iter(make_mlm_dataset(data_config(), tiny_tokenizer, r, split="train",
                                       seq_len=64, batch_size=4, seed=0))
  it = make()
  first = [next(it) for _ in range(2)]
  batch = first[0]
  assert batch["inputs"].shape == (4, 64)
  real, selected = batch["segment_ids"] > 0, batch["loss_mask"] > 0
  assert np.all(real[selected])
  np.testing.assert_array_equal(batch["inputs"][~selected], batch["targets"][~selected])
  assert not np.any((batch["inputs"] == 10) & ~selected)  # [MASK] only where predicted
  assert np.any(batch["inputs"] == 10)
  assert not np.any(np.isin(batch["targets"][selected], [BOS_ID, EOS_ID, PAD_ID]))
  assert 0.12 < selected.sum() / real.sum() < 0.18
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  resumed = make()
  resumed.set_state(state)
  for expected in want:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  # A fresh iterator replays the same batches (and so the same masks).
  again = make()
  np.testing.assert_array_equal(next(again)["inputs"], first[0]["inputs"])


def test_bad_records_name_file_and_line_or_are_skipped(tmp_path, tiny_tokenizer):
  path = tmp_path / "train.jsonl"
  lines = [json.dumps({"text": "Ashford trades salt."}), "{not json",
           json.dumps({"text": "Greywick makes copper."})]
  path.write_text("\n".join(lines) + "\n")
  r = MaskingRule.for_tokenizer(tiny_tokenizer)
  config = data_config(source="files", train_files=str(path))
  with pytest.raises(records.RecordError, match=f"{path}:2"):
    masked_documents(config, tiny_tokenizer, r, split="train")
  docs = masked_documents(data_config(source="files", train_files=str(path), skip_invalid=True),
                          tiny_tokenizer, r, split="train", num_epochs=1)
  assert len(docs) == 2

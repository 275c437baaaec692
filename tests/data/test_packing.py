"""Packing documents into causal-LM rows: exact arrays, boundaries, long documents."""

import numpy as np
import pytest

from data import packing


def _row(**arrays):
  return {k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32)
          for k, v in arrays.items()}


def _assert_rows_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(packing.ROW_KEYS)
    for key in packing.ROW_KEYS:
      assert g[key].dtype == w[key].dtype, key
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_hand_built_example():
  # BOS 2, EOS 3: two documents share a row of 7, the last two slots are padding.
  rows = packing.pack_documents([[2, 5, 6, 3], [2, 7, 3]], seq_len=7)
  _assert_rows_equal(rows, [_row(
      inputs=[2, 5, 6, 2, 7, 0, 0],
      targets=[5, 6, 3, 7, 3, 0, 0],
      segment_ids=[1, 1, 1, 2, 2, 0, 0],
      positions=[0, 1, 2, 0, 1, 0, 0],
      loss_mask=[1, 1, 1, 1, 1, 0, 0])])


def test_first_fit_over_bins():
  docs = [list(range(10, 16)), list(range(20, 27)), list(range(30, 34)), list(range(40, 43))]
  # Targets needed: 5, 6, 3, 2. First fit over 2 rows of 8: [5, 3] and [6, 2].
  rows = packing.pack_documents(docs, seq_len=8, num_bins=2)
  _assert_rows_equal(rows, [
      _row(inputs=[10, 11, 12, 13, 14, 30, 31, 32], targets=[11, 12, 13, 14, 15, 31, 32, 33],
           segment_ids=[1, 1, 1, 1, 1, 2, 2, 2], positions=[0, 1, 2, 3, 4, 0, 1, 2],
           loss_mask=[1] * 8),
      _row(inputs=[20, 21, 22, 23, 24, 25, 40, 41], targets=[21, 22, 23, 24, 25, 26, 41, 42],
           segment_ids=[1, 1, 1, 1, 1, 1, 2, 2], positions=[0, 1, 2, 3, 4, 5, 0, 1],
           loss_mask=[1] * 8)])
  # With one row open at a time, each miss emits the row: [5], [6], [3, 2].
  rows = packing.pack_documents(docs, seq_len=8, num_bins=1)
  assert [r["segment_ids"].max() for r in rows] == [1, 1, 2]
  assert [int(r["loss_mask"].sum()) for r in rows] == [5, 6, 5]


def test_causal_chunks():
  chunks = packing.causal_chunks(np.arange(10), seq_len=4)
  assert [c.tolist() for c in chunks] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
  assert all(c.dtype == np.int32 for c in chunks)
  assert [c.tolist() for c in packing.causal_chunks(range(5), 4)] == [[0, 1, 2, 3, 4]]
  assert packing.causal_chunks([7], 4) == []
  assert packing.causal_chunks([], 4) == []


def test_long_document_is_split_and_positions_restart():
  doc = np.arange(100, 140)  # 40 tokens: 39 targets = 16 + 16 + 7
  rows = packing.pack_documents([doc], seq_len=16, num_bins=1)
  assert len(rows) == 3
  np.testing.assert_array_equal(rows[0]["inputs"], np.arange(100, 116))
  np.testing.assert_array_equal(rows[1]["inputs"], np.arange(116, 132))
  np.testing.assert_array_equal(rows[1]["targets"], np.arange(117, 133))
  np.testing.assert_array_equal(rows[2]["inputs"][:7], np.arange(132, 139))
  np.testing.assert_array_equal(rows[2]["targets"][:7], np.arange(133, 140))
  for row in rows:
    n = int(row["loss_mask"].sum())
    np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
  assert [int(r["loss_mask"].sum()) for r in rows] == [16, 16, 7]


def test_every_token_is_a_target_once_and_none_crosses_a_segment():
  # Documents of consecutive, globally unique ids: a target is always its input + 1, and
  # any pair taken across two documents would break that.
  rng = np.random.default_rng(0)
  docs, start = [], 0
  for n in rng.integers(1, 60, size=300):
    docs.append(np.arange(start, start + n))
    start += n + 1000
  rows = packing.pack_documents(docs, seq_len=24, num_bins=4)
  targets = []
  for row in rows:
    mask = row["loss_mask"] > 0
    np.testing.assert_array_equal(mask, row["segment_ids"] > 0)
    np.testing.assert_array_equal(row["targets"][mask], row["inputs"][mask] + 1)
    assert not row["inputs"][~mask].any() and not row["targets"][~mask].any()
    for seg in range(1, row["segment_ids"].max() + 1):
      where = np.flatnonzero(row["segment_ids"] == seg)
      assert where.tolist() == list(range(where[0], where[-1] + 1))  # contiguous
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
    targets.extend(row["targets"][mask].tolist())
  expected = [int(t) for d in docs for t in d[1:]]
  assert sorted(targets) == sorted(expected)  # each exactly once
  # 300 documents of 9447 tokens in all: 9147 targets; 7 one-token documents have none.
  assert len(targets) == 9447 - 300
  assert len(rows) == 428  # 9147 / 24 = 381.1 rows at best; first-fit over 4 gets 89%


def test_stack_rows_pads():
  rows = packing.pack_documents([[2, 5, 3]], seq_len=4)
  batch = packing.stack_rows(rows, batch_size=3)
  assert {k: v.shape for k, v in batch.items()} == {k: (3, 4) for k in packing.ROW_KEYS}
  assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 0, 0], [0] * 4, [0] * 4])
  assert batch["loss_mask"].sum() == 2
  with pytest.raises(ValueError):
    packing.stack_rows(rows * 4, batch_size=3)


def test_packer_rejects_what_does_not_fit():
  packer = packing.FirstFitPacker(seq_len=4, num_bins=1)
  with pytest.raises(ValueError, match="causal_chunks"):
    packer.add(packing.clm_unit(np.arange(6)))
  packer.add(packing.clm_unit(np.arange(4)))
  assert not packer.fits(packing.clm_unit(np.arange(3)))
  with pytest.raises(ValueError, match="flush"):
    packer.add(packing.clm_unit(np.arange(3)))
  assert len(packer.flush()) == 1 and len(packer) == 0


def test_multi_segment_units_share_a_row_and_carry_extra_fields():
  def segment(tokens, tag):
    n = len(tokens)
    return {"inputs": np.asarray(tokens, np.int32), "targets": np.asarray(tokens, np.int32),
            "loss_mask": np.ones(n, np.float32), "pair_ids": np.full(n, tag, np.int32)}
  packer = packing.FirstFitPacker(seq_len=6, num_bins=2)
  packer.add([segment([5, 6], 1), segment([7], 1)])
  packer.add([segment([8, 9, 4], 2), segment([3, 3], 2)])   # 5 tokens: opens row 2
  packer.add([segment([1], 3), segment([2], 3)])             # fits row 1 (3 + 2 <= 6)
  row1, row2 = packer.flush()
  np.testing.assert_array_equal(row1["inputs"], [5, 6, 7, 1, 2, 0])
  np.testing.assert_array_equal(row1["segment_ids"], [1, 1, 2, 3, 4, 0])
  np.testing.assert_array_equal(row1["positions"], [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(row1["pair_ids"], [1, 1, 1, 3, 3, 0])
  np.testing.assert_array_equal(row2["pair_ids"], [2, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(row2["loss_mask"], [1, 1, 1, 1, 1, 0])
  batch = packing.stack_rows([row1], batch_size=2)
  assert batch["pair_ids"].shape == (2, 6) and not batch["pair_ids"][1].any()

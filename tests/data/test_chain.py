"""The grain chain: stream order, sharding, mixing, stream indices, packing and resumption."""

import grain
import numpy as np
import pytest

from data import chain
from data import packing


def _document(i: int) -> np.ndarray:
  """Document i: BOS 2, then 1 + i % 7 tokens 100 * i + j, then EOS 3."""
  return np.asarray([2] + [100 * i + j for j in range(1 + i % 7)] + [3], np.int32)


def _clm_units(tokens, seq_len):
  return [packing.clm_unit(c) for c in packing.causal_chunks(tokens, seq_len)]


def test_stream_is_shuffled_repeated_and_sharded_like_grain():
  records = grain.MapDataset.range(10)
  one = chain.make_stream(records, shuffle=True, seed=4, num_epochs=2)
  want = grain.MapDataset.range(10).shuffle(seed=4).repeat(2)
  assert [one[i] for i in range(20)] == [want[i] for i in range(20)]
  assert sorted(one[i] for i in range(10)) == list(range(10))
  assert [one[i] for i in range(10)] != [one[i] for i in range(10, 20)]  # reshuffled
  # Shard k of 3 holds elements k, k + 3, ... of the single-host stream, encoded.
  shards = [chain.make_stream(records, shuffle=True, seed=4, num_epochs=2, shard_index=k,
                              shard_count=3, encode=lambda x: -x) for k in range(3)]
  for k, shard in enumerate(shards):
    assert [shard[j] for j in range(len(shard))] == [-one[i] for i in range(k, 20, 3)]
  with pytest.raises(ValueError, match=r"shard_index 3 not in \[0, 3\)"):
    chain.make_stream(records, shuffle=False, seed=0, num_epochs=1, shard_index=3,
                      shard_count=3)


def test_mixed_streams_and_stream_indices():
  main, replay = grain.MapDataset.range(0, 30), grain.MapDataset.range(100, 110)
  with pytest.raises(ValueError, match="2 streams need mixing weights"):
    chain.make_stream([main, replay], shuffle=False, seed=0, num_epochs=None)
  mixed = chain.make_stream([main, replay], weights=[0.75, 0.25], shuffle=True, seed=3,
                            num_epochs=None, with_index=True)
  # Stream i is shuffled with seed + i; then 3 main records for every replay record.
  want_main = main.shuffle(seed=3).repeat(None)
  want_replay = replay.shuffle(seed=4).repeat(None)
  got = [mixed[i] for i in range(40)]
  assert [index for index, _ in got] == list(range(40))
  assert [r for _, r in got if r < 100] == [want_main[i] for i in range(30)]
  assert [r for _, r in got if r >= 100] == [want_replay[i] for i in range(10)]
  # The index is taken before sharding: the same on one host or two.
  second = chain.make_stream([main, replay], weights=[0.75, 0.25], shuffle=True, seed=3,
                             num_epochs=None, with_index=True, shard_index=1, shard_count=2)
  assert [second[j] for j in range(20)] == got[1::2]


def _batches(to_units, **kwargs):
  options = dict(batch_size=2, seq_len=12, pack_bins=3, shuffle=True, seed=1, num_epochs=None,
                 encode=_document, to_units=to_units)
  options.update(kwargs)
  return chain.make_batches(grain.MapDataset.range(40), **options)


@pytest.mark.parametrize("seq_len, pack_bins", [(6, 3), (4, 1)])
def test_packed_batches_resume_from_every_state(seq_len, pack_bins):
  # Rows of 4 or 6 cut the longer documents into chunks: windows start mid-document, and
  # windows of 3 rows end mid-batch.
  make = lambda: iter(_batches(_clm_units, seq_len=seq_len, pack_bins=pack_bins))
  it = make()
  states, batches = [], []
  for _ in range(12):
    states.append(it.get_state())
    batches.append(next(it))
  assert batches[0]["inputs"].shape == (2, seq_len)
  assert max(b["segment_ids"].max() for b in batches) > 1  # documents were packed together
  assert any(s["chunk"] if pack_bins == 1 else s["rows"] for s in states)
  for start in range(1, 12):
    resumed = make()
    resumed.set_state(states[start])
    for want in batches[start:]:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_one_example_per_row_without_packing():
  unit = lambda i: [{"inputs": _document(i)[:-1], "targets": _document(i)[1:],
                     "loss_mask": np.ones(len(_document(i)) - 1, np.float32)}]
  batches = list(_batches(None, encode=unit, num_epochs=1, shuffle=False, batch_size=4))
  assert len(batches) == 10
  segments = np.concatenate([b["segment_ids"] for b in batches])
  assert segments.max() == 1 and (segments[:, 0] == 1).all()
  first = np.concatenate([b["inputs"][:, 1] for b in batches])
  np.testing.assert_array_equal(first, [100 * i for i in range(40)])  # in stream order

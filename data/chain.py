"""The grain chain that every stage's batches go through, sharded per host and resumable.

    streams: grain MapDatasets of records (texts, rendered examples, example indices, ...)
      -> shuffle (stream i with seed + i, reshuffled every epoch) -> repeat (num_epochs)
      -> mix by weight when there are several streams (data/mixture.py: replay)
      -> [pair each record with its index in the mixed stream (`with_index`)]
      -> shard: host k of K takes every K-th record of the stream
      -> encode (the stage's per-record transform: tokenize, mask, render a pair ...)
      -> pack (data/packing.py): `to_units(example, seq_len)` cuts an example into units that
         are placed first-fit in a window of rows; or, without `to_units`, each example is
         one unit alone in a row
      -> batch (`packing.stack_rows`) [-> grain worker processes]

    make_stream    the index-based part, up to the encoded records of one host (MapDataset)
    make_batches   the whole chain, ending in `[batch_size, seq_len]` batches (IterDataset)

Every host shuffles with the same seed, so the hosts' shares are disjoint and together are the
whole stream; an index taken before sharding (`with_index`) is the same however many hosts
there are. Everything before packing is index-based, and the packer's state is where its
current window of rows began (`_PackedIterator`), so an iterator's `get_state()` is a few
JSON-serialisable integers and `set_state()` resumes with exactly the batches an
uninterrupted run would have produced.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable, Sequence

import grain

from data import packing

# (example, seq_len) -> list of packing units (data/packing.py).
UnitsFn = Callable[[object, int], list]
# One prefetch thread overlaps encoding with the train step without crowding the CPU.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=256)


def mix_datasets(datasets: Sequence[grain.MapDataset], weights: Sequence[float]
                 ) -> grain.MapDataset:
  """Interleaves map datasets deterministically in proportion to `weights` (all > 0).

  The result ends with the first input used up (relative to its weight); repeat the inputs
  first for an endless stream.
  """
  if len(datasets) != len(weights) or not datasets:
    raise ValueError(f"need one weight per dataset, got {len(datasets)} and {len(weights)}")
  if min(weights) <= 0:
    raise ValueError(f"mixing weights must be > 0, got {list(weights)}")
  return grain.MapDataset.mix(list(datasets), [float(w) for w in weights])


class _WithIndex:
  """(index, record) -> (index, record); a class so grain worker processes can pickle it."""

  def __call__(self, index: int, record) -> tuple:
    return index, record


def make_stream(streams: grain.MapDataset | Sequence[grain.MapDataset], *, shuffle: bool,
                seed: int, num_epochs: int | None, weights: Sequence[float] | None = None,
                with_index: bool = False, shard_index: int = 0, shard_count: int = 1,
                encode: Callable | None = None) -> grain.MapDataset:
  """The encoded records of one host, in stream order (index-based: random access).

  Args:
    streams: one MapDataset of records, or several to mix by `weights`.
    shuffle: shuffle every stream (stream i with `seed + i`, afresh in every epoch).
    seed: shuffle seed; the same on every host.
    num_epochs: passes over each stream; None repeats forever.
    weights: one per stream (> 0), when there are several.
    with_index: records become `(index in the mixed stream, record)` before sharding, so a
      transform seeded by it (MLM masks) does not depend on the number of hosts.
    shard_index: this host's index, in [0, shard_count).
    shard_count: number of hosts sharing the stream; element j of shard k is element
      j * shard_count + k of the single-host stream.
    encode: record -> example, applied after sharding (None: records are examples).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  streams = [streams] if isinstance(streams, grain.MapDataset) else list(streams)
  if len(streams) > 1 and weights is None:
    raise ValueError(f"{len(streams)} streams need mixing weights")
  parts = []
  for offset, ds in enumerate(streams):
    if shuffle:
      ds = ds.shuffle(seed=seed + offset)  # reshuffled with seed + offset + epoch every epoch
    parts.append(ds.repeat(num_epochs))  # None: forever
  ds = parts[0] if len(parts) == 1 else mix_datasets(parts, weights)
  if with_index:
    ds = ds.map_with_index(_WithIndex())
  ds = ds[shard_index::shard_count]
  return ds if encode is None else ds.map(encode)


def make_batches(streams: grain.MapDataset | Sequence[grain.MapDataset], *, batch_size: int,
                 seq_len: int, pack_bins: int, to_units: UnitsFn | None, shuffle: bool,
                 seed: int, num_epochs: int | None, weights: Sequence[float] | None = None,
                 with_index: bool = False, shard_index: int = 0, shard_count: int = 1,
                 encode: Callable | None = None, worker_count: int = 0) -> grain.IterDataset:
  """One host's packed batches as a grain dataset; each `iter()` starts from the beginning.

  Args:
    streams, shuffle, seed, num_epochs, weights, with_index, shard_index, shard_count,
      encode: as `make_stream`.
    batch_size: rows per batch on this host.
    seq_len: row length.
    pack_bins: rows filled at once, first-fit.
    to_units: (example, seq_len) -> packing units; None: every example is one unit, placed
      alone in a row (no packing).
    worker_count: grain worker processes (0: in this process). Each worker encodes and packs
      its own slice of this host's records and batches are taken from the workers in turn:
      the order differs from `worker_count=0` but is fixed for a given count, and a saved
      state resumes only with the same count. Grain's workers need absl flags parsed.

  Returns:
    Batches: dicts of numpy arrays `[batch_size, seq_len]`, the packed rows' fields
    (`inputs`, `targets`, `segment_ids`, `positions`, `loss_mask`, any per-token fields of
    the units). A final partial batch is completed with padding rows (loss_mask 0), so every
    batch has the same shape.
  """
  ds = make_stream(streams, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                   weights=weights, with_index=with_index, shard_index=shard_index,
                   shard_count=shard_count, encode=encode)
  if to_units is None:
    ds = ds.map(OneRow(seq_len)).to_iter_dataset(_READ_OPTIONS)
  else:
    ds = PackedIterDataset(ds.to_iter_dataset(_READ_OPTIONS), seq_len, pack_bins, to_units)
  ds = ds.batch(batch_size, batch_fn=functools.partial(packing.stack_rows,
                                                       batch_size=batch_size))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


class OneRow:
  """A unit alone in a row; a class so grain worker processes can pickle it."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def __call__(self, unit: list[dict]) -> dict:
    packer = packing.FirstFitPacker(self._seq_len, 1)
    packer.add(unit)
    return packer.flush()[0]


class PackedIterDataset(grain.IterDataset):
  """Packs a stream of examples into rows (see data/packing.py); `to_units(example, seq_len)`
  says how one example becomes packing units."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, num_bins: int, to_units: UnitsFn):
    super().__init__(parent)
    self._seq_len, self._num_bins, self._to_units = seq_len, num_bins, to_units

  def __iter__(self) -> _PackedIterator:
    return _PackedIterator(self._parent.__iter__(), self._seq_len, self._num_bins,
                           self._to_units)

  def __str__(self) -> str:
    return f"PackedIterDataset(seq_len={self._seq_len}, num_bins={self._num_bins})"


class _PackedIterator(grain.DatasetIterator):
  """Fills a window of rows first-fit, then emits them; the state is where the window began.

  State: `parent` (the parent's state before the example holding the window's first unit),
  `chunk` (that unit's index in its example) and `rows` (rows of the window already emitted).
  Restoring replays the window from there, so no token data is saved.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, num_bins: int,
               to_units: UnitsFn):
    super().__init__(parent)
    self._seq_len, self._num_bins, self._to_units = seq_len, num_bins, to_units
    self._rows, self._next_row = [], 0
    # Units of the current example not yet packed, and where they come from.
    self._pending, self._pending_origin = [], (self._parent.get_state(), 0)
    self._window_origin = self._pending_origin
    self._skip_chunks = 0  # after set_state: units of the first example already packed

  def __next__(self) -> dict:
    while self._next_row >= len(self._rows):
      self._fill_window()
    row = self._rows[self._next_row]
    self._next_row += 1
    return row

  def _fill_window(self) -> None:
    packer = packing.FirstFitPacker(self._seq_len, self._num_bins)
    window_origin = None
    while True:
      if not self._pending:
        # Copied: an iterator may hand out its live state dict and mutate it later.
        parent_state = copy.deepcopy(self._parent.get_state())
        try:
          example = next(self._parent)
        except StopIteration:
          break
        self._pending = self._to_units(example, self._seq_len)[self._skip_chunks:]
        self._pending_origin = (parent_state, self._skip_chunks)
        self._skip_chunks = 0
        continue
      if not packer.fits(self._pending[0]):
        break
      if window_origin is None:
        window_origin = self._pending_origin
      packer.add(self._pending.pop(0))
      self._pending_origin = (self._pending_origin[0], self._pending_origin[1] + 1)
    if not len(packer):
      raise StopIteration
    self._rows, self._next_row = packer.flush(), 0
    self._window_origin = window_origin

  def get_state(self) -> dict:
    if self._next_row >= len(self._rows):
      # The window is used up: the next one starts at the pending unit.
      parent_state, chunk = self._pending_origin
      return {"parent": parent_state, "chunk": chunk, "rows": 0}
    parent_state, chunk = self._window_origin
    return {"parent": parent_state, "chunk": chunk, "rows": self._next_row}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._pending, self._pending_origin = [], (state["parent"], state["chunk"])
    self._skip_chunks = state["chunk"]
    self._rows, self._next_row = [], 0
    if state["rows"]:
      self._fill_window()
      self._next_row = state["rows"]

  def __str__(self) -> str:
    return f"_PackedIterator(seq_len={self._seq_len}, num_bins={self._num_bins})"

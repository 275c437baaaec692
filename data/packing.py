"""Packing of tokenized documents into fixed-length causal-LM rows (pure numpy).

A document `d` (token ids, already framed by BOS / EOS) becomes one segment whose
`inputs = d[:-1]` and `targets = d[1:]`, so no target crosses a document boundary. A document
longer than `seq_len + 1` tokens is cut into chunks of `seq_len + 1` tokens that overlap by
one token (`causal_chunks`): every token but the first is a target exactly once. Each chunk
is its own segment, and its positions restart at 0: a continuation chunk sees none of the
text before it (attention never crosses a segment), so its first positions are the start
of a context window, not the middle of a document.

Other stages pack the same way. What the packer places is a *unit*: a list of segments that
must share a row (one chunk for CLM; a chosen / rejected pair for preference stages). A
segment is a dict of equal-length per-token arrays holding at least `inputs`, `targets` and
`loss_mask`, plus any per-token fields its stage needs (they are copied into the row, zero
on padding); `positions` defaults to 0..n-1. `clm_unit` turns a CLM chunk into a unit.

Rows are filled first-fit over `num_bins` open rows (`FirstFitPacker`); when a chunk fits
none of them, all open rows are emitted in order and packing starts afresh. Emitting a whole
window at once is what makes the packing resumable: the state of a packed stream is where
its current window started in the input and how many of its rows were consumed.

Example: with seq_len 5, documents [2, 5, 6, 3] and [2, 7, 3] (BOS 2, EOS 3) fill one row:

    inputs      [2, 5, 6, 2, 7]
    targets     [5, 6, 3, 7, 3]
    segment_ids [1, 1, 1, 2, 2]
    positions   [0, 1, 2, 0, 1]
    loss_mask   [1, 1, 1, 1, 1]
"""

import numpy as np

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def causal_chunks(tokens, seq_len: int) -> list:
  """Cuts a document into chunks of at most `seq_len + 1` tokens, overlapping by one.

  Args:
    tokens: [n] token ids of one document.
    seq_len: the row length; a chunk yields at most `seq_len` (input, target) pairs.

  Returns:
    int32 arrays: chunk i is `tokens[i * seq_len : (i + 1) * seq_len + 1]`. A document of
    fewer than 2 tokens has no target and gives no chunk.
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  return [tokens[start:start + seq_len + 1] for start in range(0, len(tokens) - 1, seq_len)]


def empty_row(seq_len: int, like: dict | None = None) -> dict:
  """An all-padding row: every array [seq_len], zero, loss_mask 0.

  Args:
    seq_len: row length.
    like: a row (or segment) whose keys and dtypes to copy; default the CLM `ROW_KEYS`.
  """
  if like is None:
    row = {key: np.zeros(seq_len, np.int32) for key in ROW_KEYS}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    return row
  row = {key: np.zeros(seq_len, np.asarray(value).dtype) for key, value in like.items()}
  row.setdefault("segment_ids", np.zeros(seq_len, np.int32))
  row.setdefault("positions", np.zeros(seq_len, np.int32))
  return row


def clm_unit(chunk) -> list:
  """A causal chunk of n+1 tokens as a one-segment unit of n (input, target) pairs."""
  chunk = np.asarray(chunk, np.int32)
  return [{"inputs": chunk[:-1], "targets": chunk[1:],
           "loss_mask": np.ones(len(chunk) - 1, np.float32)}]


def unit_length(unit) -> int:
  return sum(len(segment["inputs"]) for segment in unit)


class FirstFitPacker:
  """Places units into the first of `num_bins` rows with room; emits them on `flush`."""

  def __init__(self, seq_len: int, num_bins: int):
    if seq_len < 1 or num_bins < 1:
      raise ValueError(f"need seq_len >= 1 and num_bins >= 1, got {seq_len}, {num_bins}")
    self.seq_len = seq_len
    self.num_bins = num_bins
    self._bins = []  # per open row: its segments
    self._used = []  # per open row: positions taken

  def __len__(self) -> int:
    """Number of open rows."""
    return len(self._bins)

  def _slot(self, unit) -> int | None:
    need = unit_length(unit)
    if need > self.seq_len or need < 1:
      raise ValueError(f"a unit of {need} tokens does not fit rows of 1 to {self.seq_len}; "
                       "cut CLM documents with causal_chunks first")
    for i, used in enumerate(self._used):
      if self.seq_len - used >= need:
        return i
    return len(self._bins) if len(self._bins) < self.num_bins else None

  def fits(self, unit) -> bool:
    """Whether `unit` fits an open row or a row that may still be opened."""
    return self._slot(unit) is not None

  def add(self, unit) -> None:
    """Places `unit` first-fit; raises ValueError when it fits nowhere (`flush` first)."""
    slot = self._slot(unit)
    if slot is None:
      raise ValueError("no row has room for this unit; flush the packer first")
    if slot == len(self._bins):
      self._bins.append([])
      self._used.append(0)
    self._bins[slot].extend(unit)
    self._used[slot] += unit_length(unit)

  def flush(self) -> list:
    """Returns the open rows, in the order they were opened, and empties the packer."""
    rows = [self._make_row(b) for b in self._bins]
    self._bins, self._used = [], []
    return rows

  def _make_row(self, segments: list) -> dict:
    row = empty_row(self.seq_len, like=segments[0])
    start = 0
    for segment_id, segment in enumerate(segments, start=1):
      end = start + len(segment["inputs"])
      for key, value in segment.items():
        row[key][start:end] = value
      row["segment_ids"][start:end] = segment_id
      if "positions" not in segment:
        row["positions"][start:end] = np.arange(end - start, dtype=np.int32)
      start = end
    return row


def pack_documents(documents, seq_len: int, num_bins: int = 1) -> list:
  """Packs whole token lists into rows, windowing exactly as the grain pipeline does.

  Args:
    documents: iterable of [n_i] token ids, each a whole document with BOS / EOS.
    seq_len: row length.
    num_bins: rows open at once (1: fill one row at a time, in order).

  Returns:
    Rows: dicts of `inputs`, `targets`, `segment_ids`, `positions` (int32 [seq_len]) and
    `loss_mask` (float32 [seq_len]).
  """
  packer, rows = FirstFitPacker(seq_len, num_bins), []
  for doc in documents:
    for chunk in causal_chunks(doc, seq_len):
      unit = clm_unit(chunk)
      if not packer.fits(unit):
        rows.extend(packer.flush())
      packer.add(unit)
  rows.extend(packer.flush())
  return rows


def stack_rows(rows: list, batch_size: int) -> dict:
  """Stacks up to `batch_size` rows into [batch_size, seq_len] arrays, padding with empty rows.

  Padding rows have segment_ids 0 and loss_mask 0, so a short final (eval) batch adds
  nothing to a loss sum.
  """
  if not rows or len(rows) > batch_size:
    raise ValueError(f"need 1 to {batch_size} rows, got {len(rows)}")
  seq_len = len(rows[0]["inputs"])
  rows = list(rows) + [empty_row(seq_len, like=rows[0])] * (batch_size - len(rows))
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

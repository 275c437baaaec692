"""Packing of tokenized documents into fixed-length causal-LM rows (pure numpy).

A document `d` (token ids, already framed by BOS / EOS) becomes one segment whose
`inputs = d[:-1]` and `targets = d[1:]`, so no target crosses a document boundary. A document
longer than `seq_len + 1` tokens is cut into chunks of `seq_len + 1` tokens that overlap by
one token (`causal_chunks`): every token but the first is a target exactly once. Each chunk
is its own segment, and its positions restart at 0: a continuation chunk sees none of the
text before it (attention never crosses a segment), so its first positions are the start
of a context window, not the middle of a document.

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


def empty_row(seq_len: int) -> dict:
  """An all-padding row: every array [seq_len], zero, loss_mask 0."""
  row = {key: np.zeros(seq_len, np.int32) for key in ROW_KEYS}
  row["loss_mask"] = np.zeros(seq_len, np.float32)
  return row


class FirstFitPacker:
  """Places chunks into the first of `num_bins` rows with room; emits them on `flush`."""

  def __init__(self, seq_len: int, num_bins: int):
    if seq_len < 1 or num_bins < 1:
      raise ValueError(f"need seq_len >= 1 and num_bins >= 1, got {seq_len}, {num_bins}")
    self.seq_len = seq_len
    self.num_bins = num_bins
    self._bins = []  # per open row: its chunks
    self._used = []  # per open row: positions taken

  def __len__(self) -> int:
    """Number of open rows."""
    return len(self._bins)

  def _slot(self, chunk) -> int | None:
    need = len(chunk) - 1
    if need > self.seq_len or need < 1:
      raise ValueError(f"chunk of {len(chunk)} tokens does not make 1 to {self.seq_len} "
                       "targets; cut it with causal_chunks first")
    for i, used in enumerate(self._used):
      if self.seq_len - used >= need:
        return i
    return len(self._bins) if len(self._bins) < self.num_bins else None

  def fits(self, chunk) -> bool:
    """Whether `chunk` fits an open row or a row that may still be opened."""
    return self._slot(chunk) is not None

  def add(self, chunk) -> None:
    """Places `chunk` first-fit; raises ValueError when it fits nowhere (`flush` first)."""
    slot = self._slot(chunk)
    if slot is None:
      raise ValueError("no row has room for this chunk; flush the packer first")
    if slot == len(self._bins):
      self._bins.append([])
      self._used.append(0)
    self._bins[slot].append(np.asarray(chunk, np.int32))
    self._used[slot] += len(chunk) - 1

  def flush(self) -> list:
    """Returns the open rows, in the order they were opened, and empties the packer."""
    rows = [self._make_row(b) for b in self._bins]
    self._bins, self._used = [], []
    return rows

  def _make_row(self, chunks: list) -> dict:
    row = empty_row(self.seq_len)
    start = 0
    for segment_id, chunk in enumerate(chunks, start=1):
      n = len(chunk) - 1
      end = start + n
      row["inputs"][start:end] = chunk[:-1]
      row["targets"][start:end] = chunk[1:]
      row["segment_ids"][start:end] = segment_id
      row["positions"][start:end] = np.arange(n, dtype=np.int32)
      row["loss_mask"][start:end] = 1.0
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
      if not packer.fits(chunk):
        rows.extend(packer.flush())
      packer.add(chunk)
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
  rows = list(rows) + [empty_row(seq_len)] * (batch_size - len(rows))
  return {key: np.stack([r[key] for r in rows]) for key in ROW_KEYS}

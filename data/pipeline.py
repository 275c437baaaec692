"""The grain input pipeline for causal-LM batches, sharded per host and resumable.

    texts (tiny world | local files | tfds array_record)
      -> shuffle (seeded, reshuffled every epoch; train only) -> repeat
      -> shard: host k of K takes every K-th document of the shuffled stream
      -> tokenize (BOS / EOS per config) -> pack (data/packing.py) -> batch

Every host shuffles with the same seed, so the hosts' shares are disjoint and together are
the whole stream. Everything before packing is index-based (a `MapDataset`), so the iterator
state is a few integers: `get_state()` is JSON-serialisable and `set_state()` resumes with
exactly the batches an uninterrupted run would have produced.
"""

import collections
import copy
import functools
import math
import os
from typing import Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from data import packing
from data import records
from data import tfds_builder
from data import tiny_world
from data.tokenizer import (Tokenizer, copy_hf_tokenizer, is_hf_tokenizer,
                            train_sentencepiece)

SPLITS = ("train", "eval")


def load_texts(data_config: ml_collections.ConfigDict, split: str,
               workdir: str | None = None) -> Sequence[str]:
  """The documents of `split` as a random-access sequence of strings.

  Args:
    data_config: `config.data`.
    split: 'train' or 'eval'.
    workdir: for source 'tiny_world', the corpus is written to `{workdir}/data/*.jsonl`
      and read back from there; without one it is generated in memory (the same text).

  Returns:
    A list (tiny_world, files) or a `TextSource` over array_record (tfds).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  train = split == "train"
  if data_config.source == "tiny_world":
    tw_split = "train" if train else "validation"
    if workdir:
      paths = _tiny_world_files(
          os.path.join(workdir, "data"), data_config.tiny_world_train_docs,
          data_config.tiny_world_eval_docs, data_config.tiny_world_domain)
      return list(records.iter_text_records(paths[tw_split]))
    num = data_config.tiny_world_train_docs if train else data_config.tiny_world_eval_docs
    return _tiny_world_docs(tw_split, num, data_config.tiny_world_domain)
  if data_config.source == "files":
    patterns = data_config.train_files if train else data_config.eval_files
    if not patterns:
      raise ValueError(f"config.data.{'train' if train else 'eval'}_files is empty")
    counter = records.SkipCounter()
    texts = list(records.iter_text_records(
        patterns, text_field=data_config.text_field, txt_blocks=data_config.txt_blocks,
        skip_invalid=data_config.skip_invalid, counter=counter))
    if counter.skipped:
      logging.warning("%s: skipped %d malformed records %s", patterns, counter.skipped,
                      dict(counter.reasons))
    return texts
  if data_config.source == "tfds":
    return tfds_builder.open_tfds_source(
        data_config.tfds_name, data_config.tfds_data_dir,
        data_config.train_split if train else data_config.eval_split, data_config.text_field)
  raise ValueError(f"unknown config.data.source {data_config.source!r}: "
                   "tiny_world, files, tfds")


@functools.lru_cache(maxsize=8)
def _tiny_world_files(out_dir: str, num_train: int, num_eval: int, domain: str) -> dict:
  # Written and checked once per process, so a fresh eval iterator costs only a read.
  return tiny_world.ensure_tiny_world(out_dir, num_train, num_eval, domain)


@functools.lru_cache(maxsize=8)
def _tiny_world_docs(split: str, num: int, domain: str) -> tuple:
  return tuple(tiny_world.generate_documents(split, num, domain=domain))


def resolve_tokenizer(data_config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """Loads `data_config.tokenizer`, or the workdir's own model, training it if absent.

  A configured tokenizer is also copied to `{workdir}/tokenizer/spm.model` (if absent), so
  every run's folder holds the tokenizer its params belong to. Without a configured path the
  model is `{workdir}/tokenizer/spm.model`, trained once on the training texts with
  `data_config.tokenizer_vocab_size` pieces and reused afterwards.
  For a large corpus train one with `scripts/train_tokenizer.py` and set
  `config.data.tokenizer` instead.
  """
  prefix = os.path.join(workdir, "tokenizer", "spm")
  if data_config.tokenizer and is_hf_tokenizer(data_config.tokenizer):
    # A converted model's tokenizer.json (models/convert): copied into the run like a .model.
    return copy_hf_tokenizer(data_config.tokenizer, os.path.dirname(prefix))
  if data_config.tokenizer:
    with open(data_config.tokenizer, "rb") as f:
      proto = f.read()
    if not os.path.exists(prefix + ".model"):
      # A copy in the run's own folder, where a later stage started from this run looks for
      # it (configs/base.py tokenizer_of_run): pretrain -> SFT -> DPO chains keep one tokenizer.
      _write_file_atomic(prefix + ".model", proto)
    return Tokenizer(proto)
  if not os.path.exists(prefix + ".model"):
    logging.info("Training a %d-piece tokenizer into %s.model", data_config.tokenizer_vocab_size,
                 prefix)
    train_sentencepiece(load_texts(data_config, "train", workdir), prefix,
                        data_config.tokenizer_vocab_size)
  tok = Tokenizer.load(prefix + ".model")
  if tok.vocab_size != data_config.tokenizer_vocab_size:
    raise ValueError(f"{prefix}.model has {tok.vocab_size} pieces but "
                     f"config.data.tokenizer_vocab_size is {data_config.tokenizer_vocab_size};"
                     " delete it to retrain, or set config.data.tokenizer")
  return tok


def _write_file_atomic(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


class _Tokenize:
  """Text -> int32 token ids; a class, not a lambda, so grain worker processes can pickle it."""

  def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
    self._tokenizer, self._add_bos, self._add_eos = tokenizer, add_bos, add_eos

  def __call__(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_bos=self._add_bos,
                                             add_eos=self._add_eos), np.int32)


def clm_units(tokens: np.ndarray, seq_len: int) -> list:
  """A tokenized document as CLM packing units (one per causal chunk)."""
  return [packing.clm_unit(chunk) for chunk in packing.causal_chunks(tokens, seq_len)]


class PackedIterDataset(grain.IterDataset):
  """Packs a stream of examples into rows (see data/packing.py).

  `to_units(example, seq_len) -> list of units` says how one example becomes packing units;
  the default treats examples as tokenized documents for causal LM.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int, num_bins: int,
               to_units=clm_units):
    super().__init__(parent)
    self._seq_len, self._num_bins, self._to_units = seq_len, num_bins, to_units

  def __iter__(self) -> "_PackedIterator":
    return _PackedIterator(self._parent.__iter__(), self._seq_len, self._num_bins,
                           self._to_units)

  def __str__(self) -> str:
    return f"PackedIterDataset(seq_len={self._seq_len}, num_bins={self._num_bins})"


class _PackedIterator(grain.DatasetIterator):
  """Fills a window of rows first-fit, then emits them; the state is where the window began.

  State: `parent` (the parent's state before the document holding the window's first
  chunk), `chunk` (that chunk's index in its document) and `rows` (rows of the window
  already emitted). Restoring replays the window from there, so no token data is saved.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, num_bins: int,
               to_units=clm_units):
    super().__init__(parent)
    self._seq_len, self._num_bins, self._to_units = seq_len, num_bins, to_units
    self._rows, self._next_row = [], 0
    # Chunks of the current document not yet packed, and where they come from.
    self._pending, self._pending_origin = [], (self._parent.get_state(), 0)
    self._window_origin = self._pending_origin
    self._skip_chunks = 0  # after set_state: chunks of the first document already packed

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
          tokens = next(self._parent)
        except StopIteration:
          break
        self._pending = self._to_units(tokens, self._seq_len)[self._skip_chunks:]
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
      # The window is used up: the next one starts at the pending chunk.
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


def make_clm_dataset(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                     split: str, seq_len: int, batch_size: int, shard_index: int = 0,
                     shard_count: int = 1, seed: int = 0, num_epochs: int | None = None,
                     workdir: str | None = None) -> grain.IterDataset:
  """The CLM batches of one host as a grain dataset; each `iter()` starts from the beginning.

  Args:
    data_config: `config.data` (source, files, BOS / EOS, shuffle, pack_bins, workers).
    tokenizer: the tokenizer.
    split: 'train' (shuffled, repeated forever by default) or 'eval' (file order, one pass).
    seq_len: tokens per row.
    batch_size: rows per batch on this host (the global batch / number of hosts).
    shard_index: this host's index, in [0, shard_count).
    shard_count: number of hosts sharing the data.
    seed: shuffle seed; the same on every host.
    num_epochs: passes over the data; None repeats forever for 'train', one pass for 'eval'.
    workdir: where the tiny world is written (see `load_texts`).

  Returns:
    Batches: dicts of numpy arrays [batch_size, seq_len]: `inputs`, `targets`,
    `segment_ids` (1, 2, ... per segment in a row, 0 on padding), `positions` (0-based per
    segment) as int32 and `loss_mask` as float32. A final partial batch is completed with
    padding rows (loss_mask 0), so every batch has the same shape.

  With `data_config.worker_count > 0`, each grain worker process tokenizes and packs its
  own slice of this host's documents and batches are taken from the workers in turn: the
  order differs from `worker_count=0` but is fixed for a given count, and a saved state
  resumes only with the same count. Grain's workers need absl flags parsed (`app.run`).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  train = split == "train"
  texts = load_texts(data_config, split, workdir)
  if not len(texts):
    raise ValueError(f"no documents in the {split} split of {data_config.source!r}")
  ds = grain.MapDataset.source(texts)
  if train and data_config.shuffle:
    ds = ds.shuffle(seed=seed)  # reshuffled with seed + epoch in every epoch
  if num_epochs is None and not train:
    num_epochs = 1  # eval is a fixed set
  ds = ds.repeat(num_epochs)  # None: forever
  ds = ds[shard_index::shard_count]
  ds = ds.map(_Tokenize(tokenizer, data_config.add_bos, data_config.add_eos))
  # One prefetch thread overlaps tokenizing with the train step without crowding the CPU.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=256))
  ds = PackedIterDataset(ds, seq_len, data_config.pack_bins)
  ds = ds.batch(batch_size, batch_fn=functools.partial(packing.stack_rows,
                                                       batch_size=batch_size))
  if data_config.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return ds


def make_clm_iterator(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                      split: str, seq_len: int, batch_size: int, shard_index: int = 0,
                      shard_count: int = 1, seed: int = 0, num_epochs: int | None = None,
                      workdir: str | None = None) -> grain.DatasetIterator:
  """An iterator over `make_clm_dataset(...)` with `get_state()` / `set_state(state)`."""
  return iter(make_clm_dataset(
      data_config, tokenizer, split=split, seq_len=seq_len, batch_size=batch_size,
      shard_index=shard_index, shard_count=shard_count, seed=seed, num_epochs=num_epochs,
      workdir=workdir))


def unigram_entropy(token_lists) -> float:
  """Entropy, in nats per token, of the empirical unigram distribution of the tokens.

  The loss of a model that ignores context entirely; a CLM's held-out loss should end far
  below it. Pass the tokens that are targets (documents with EOS, without BOS) to compare
  with the CLM loss.
  """
  counts = collections.Counter()
  for tokens in token_lists:
    counts.update(int(t) for t in tokens)
  total = sum(counts.values())
  if not total:
    raise ValueError("no tokens")
  return -sum(c / total * math.log(c / total) for c in counts.values())

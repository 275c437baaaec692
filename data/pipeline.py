"""Causal-LM batches: the text source, the tokenizer, and the CLM end of the grain chain.

    texts (data/sources.py: tiny world | local files | tfds array_record)
      -> data/chain.py: shuffle (seeded, reshuffled every epoch; train only) -> repeat
         -> shard: host k of K takes every K-th document of the shuffled stream
         -> tokenize (BOS / EOS per config) -> pack (`clm_units`, data/packing.py) -> batch

Every host shuffles with the same seed, so the hosts' shares are disjoint and together are
the whole stream. Everything before packing is index-based (a `MapDataset`), so the iterator
state is a few integers: `get_state()` is JSON-serialisable and `set_state()` resumes with
exactly the batches an uninterrupted run would have produced.
"""

import collections
import math
import os
from typing import Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from data import chain
from data import packing
from data import sources
from data.tokenizer import (Tokenizer, copy_hf_tokenizer, is_hf_tokenizer,
                            train_sentencepiece)

SPLITS = ("train", "eval")


def load_texts(data_config: ml_collections.ConfigDict, split: str,
               workdir: str | None = None) -> Sequence[str]:
  """The documents of `split` ('train' | 'eval') as a random-access sequence of strings
  (`sources.load_records` of kind 'texts').

  Args:
    data_config: `config.data`.
    split: 'train' or 'eval'.
    workdir: for source 'tiny_world', the corpus is written to `{workdir}/data/*.jsonl`
      and read back from there; without one it is generated in memory (the same text).

  Returns:
    A list (files, tiny_world with a workdir), a tuple (tiny_world in memory) or a
    `TextSource` over array_record (tfds).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return sources.load_records(data_config, "texts", split, workdir)


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


class Tokenize:
  """Text -> int32 token ids; a class, not a lambda, so grain worker processes can pickle it."""

  def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
    self._tokenizer, self._add_bos, self._add_eos = tokenizer, add_bos, add_eos

  def __call__(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_bos=self._add_bos,
                                             add_eos=self._add_eos), np.int32)


def clm_units(tokens: np.ndarray, seq_len: int) -> list:
  """A tokenized document as CLM packing units (one per causal chunk)."""
  return [packing.clm_unit(chunk) for chunk in packing.causal_chunks(tokens, seq_len)]


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

  With `data_config.worker_count > 0` grain worker processes tokenize and pack, in another
  fixed order (`chain.make_batches`); grain's workers need absl flags parsed (`app.run`).
  """
  train = split == "train"
  texts = load_texts(data_config, split, workdir)
  if not len(texts):
    raise ValueError(f"no documents in the {split} split of {data_config.source!r}")
  return chain.make_batches(
      grain.MapDataset.source(texts), shuffle=train and data_config.shuffle, seed=seed,
      num_epochs=1 if num_epochs is None and not train else num_epochs,  # eval: a fixed set
      shard_index=shard_index, shard_count=shard_count,
      encode=Tokenize(tokenizer, data_config.add_bos, data_config.add_eos),
      to_units=clm_units, seq_len=seq_len, pack_bins=data_config.pack_bins,
      batch_size=batch_size, worker_count=data_config.worker_count)


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

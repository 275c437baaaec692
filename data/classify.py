"""Labelled text for task fine-tuning: records, the tiny world's task, and packed batches.

Records (docs/formats.md), one example each, field names from `config.data`:

    {"text": "A warm, funny film.", "label": 1}                         text_field, label_field
    {"premise": "...", "hypothesis": "...", "label": "entailment"}      + text_pair_field
    {"sentence1": "...", "sentence2": "...", "label": 3.8}              regression

so IMDb (tfds `imdb_reviews`: text, label), GLUE SST-2 (sentence, label), MNLI (premise,
hypothesis, label 0-2) and STS-B (sentence1, sentence2, a float label) are read as they are. A
label is an int in [0, num_labels), a name from `config.data.label_names` (its index), or for
regression a number. A missing label (reason 'missing_label'), an int out of range or a
non-finite number (GLUE's unlabelled test rows carry -1; 'bad_label') and an unknown name
('unknown_label') make the record invalid: an error naming file:line, or skipped and counted
with `skip_invalid`, as every other record (data/records.py).

The tiny world's task (`goods_records`): which of the 12 goods is a sentence about? Sentences
of the world corpus that name one good, or one trade and so its good ("In Ashford lives Ada,
a weaver." is about linen: the world's facts); labels are the goods' names. Held-out sentences
are never trained on (a split by text) and come from the corpus's held-out documents.

Encoding, one example per packed segment (a unit of data/packing.py):

    decoder  [BOS] a [pair_separator b] [EOS]   read at the last token (HF's last non-pad)
    encoder  [CLS] a [SEP] (b [SEP])            read at the first token; token_type_ids 0
                                                on [CLS] a [SEP], 1 on b [SEP]

[CLS] / [SEP] are the tokenizer's own pieces when it has them (BERT's WordPiece), else BOS /
EOS. Texts too long for `seq_len` lose tokens from their end, the longer of a pair first
(HF's 'longest_first'). Per-token fields of a segment: `inputs`, `loss_mask` (1 at the token
the stage reads: the pooled token), `labels` (the example's label on every token: int32, or
float32 for regression), `example_ids` (its index in the split, to align predictions),
`token_type_ids` (encoder); plus `segment_ids` and `positions` from packing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import zlib
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np

from data import chain, tiny_world
from data.records import InvalidRecord, require_text
from data.tiny_tasks import _write_if_changed
from data.world import World, build_world

PROBLEM_TYPES = ("classification", "regression")
BODIES = ("decoder", "encoder")
# The tiny world's goods in label-id order (configs/classify.py `label_names` of the tiny task).
TINY_LABEL_NAMES = tuple(g.name for g in build_world().goods)
_SENTENCE_END = re.compile(r"(?<=\.) ")
_VALIDATION_BUCKETS = 5


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """What a valid label is: an int in [0, num_labels) or one of `names`, or a number."""
  num_labels: int
  regression: bool = False
  names: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict, num_labels: int,
                  problem_type: str) -> LabelSpec:
    """From `config.data.label_names` (comma-separated), `config.model.num_labels` and
    `config.objective.problem_type`; raises ValueError naming the key that disagrees."""
    if problem_type not in PROBLEM_TYPES:
      raise ValueError(f"config.objective.problem_type: unknown {problem_type!r} "
                       f"({' | '.join(PROBLEM_TYPES)})")
    names = tuple(n.strip() for n in data_config.get("label_names", "").split(",") if n.strip())
    regression = problem_type == "regression"
    if regression and num_labels != 1:
      raise ValueError(f"config.model.num_labels must be 1 for regression, got {num_labels}")
    if not regression and num_labels < 2:
      raise ValueError(f"config.model.num_labels must be >= 2 for classification, got "
                       f"{num_labels}")
    if names and (regression or len(names) != num_labels):
      raise ValueError(f"config.data.label_names has {len(names)} names {list(names)} for "
                       f"config.model.num_labels {num_labels}"
                       + (" (regression has no names)" if regression else ""))
    return cls(num_labels, regression, names)

  def parse(self, value: Any) -> int | float:
    """The label id (or value) of a record's label; raises InvalidRecord."""
    if value is None:
      raise InvalidRecord("missing_label", "the label is null")
    if isinstance(value, bool):
      raise InvalidRecord("bad_label", f"label {value!r}: a boolean is not a label")
    if self.regression:
      try:
        number = float(value)
      except (TypeError, ValueError):
        raise InvalidRecord("bad_label", f"label {value!r} is not a number") from None
      if not math.isfinite(number):
        raise InvalidRecord("bad_label", f"label {value!r} is not finite")
      return number
    if isinstance(value, str):
      if value in self.names:
        return self.names.index(value)
      if not value.strip().lstrip("-").isdigit():
        known = f"one of {list(self.names)}" if self.names else "none (config.data.label_names)"
        raise InvalidRecord("unknown_label", f"label {value!r} is not a known name; known: "
                            f"{known}")
      value = int(value)
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if not isinstance(value, int) or not 0 <= value < self.num_labels:
      raise InvalidRecord("bad_label", f"label {value!r} is not an int in [0, "
                          f"{self.num_labels})")
    return value

  def name(self, label: int) -> str:
    return self.names[label] if self.names else str(label)


@dataclasses.dataclass(frozen=True)
class Labelled:
  """One example: a text or a pair of texts, and its label (None: unlabelled input)."""
  text: str
  text_b: str | None = None
  label: int | float | None = None


def labelled_parser(data_config: ml_collections.ConfigDict, labels: LabelSpec, *,
                    require_label: bool = True) -> Callable[[Any], Labelled]:
  """Record -> `Labelled`, with `config.data.{text_field, text_pair_field, label_field}`;
  without `require_label` labels are not read (files to predict: `label` None)."""
  text_field, pair_field = data_config.text_field, data_config.get("text_pair_field", "")
  label_field = data_config.get("label_field", "label")

  def parse(obj: Any) -> Labelled:
    text = require_text(obj, text_field)
    text_b = require_text(obj, pair_field) if pair_field else None
    if not require_label:
      return Labelled(text, text_b)
    if label_field not in obj:
      raise InvalidRecord("missing_label", f"missing field {label_field!r} (fields: "
                          f"{sorted(obj)})")
    return Labelled(text, text_b, labels.parse(obj[label_field]))
  return parse


# --- The tiny world's task ------------------------------------------------------------------

def _goods_named(sentence: str, w: World) -> set[str]:
  """The goods a sentence names, or names through the trade that makes them ("Ada, a
  weaver" is about linen)."""
  words = set(re.findall(r"[a-z]+", sentence.lower()))
  return {g.name for g in w.goods if g.name in words or g.trade in words}


@functools.lru_cache(maxsize=8)
def goods_records(split: str, num: int, seed: int = 0) -> tuple[dict, ...]:
  """`num` records {"text": a sentence, "label": the one good it is about} of `split`
  ('train' | 'validation'): sentences of the world corpus (data/tiny_world.py) about exactly
  one good, by its name or its maker's trade.

  A sentence's text decides its split (CRC-32 bucket, one in `_VALIDATION_BUCKETS`), so no
  held-out sentence is ever trained on; held-out ones are also taken from the corpus's
  held-out documents only, and are distinct (training ones repeat as often as the corpus
  says them).
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
  w, held_out = build_world(), split == "validation"
  # A document has ~1.5 training sentences; a held-out one ~0.07 new distinct ones.
  out, seen, docs = [], set(), (16 if held_out else 1) * num
  while len(out) < num:
    if docs > 1_000 * num:
      raise ValueError(f"the tiny world has fewer than {num} distinct {split} sentences")
    out, seen = [], set()
    for doc in tiny_world.generate_documents(split, docs, seed=seed, domain="world"):
      for sentence in _SENTENCE_END.split(doc):
        goods = _goods_named(sentence, w)
        if (len(goods) != 1 or (held_out and sentence in seen)
            or (zlib.crc32(sentence.encode()) % _VALIDATION_BUCKETS == 0) != held_out):
          continue
        seen.add(sentence)
        out.append({"text": sentence, "label": goods.pop()})
    docs *= 2
  return tuple(out[:num])


def ensure_tiny_goods(out_dir: str, num_train: int, num_validation: int,
                      seed: int = 0) -> dict[str, str]:
  """Writes `{out_dir}/tiny_goods-{split}.jsonl` (unless already identical); returns the
  paths as {'train': ..., 'validation': ...}."""
  paths = {}
  for split, num in (("train", num_train), ("validation", num_validation)):
    paths[split] = os.path.join(out_dir, f"tiny_goods-{split}.jsonl")
    _write_if_changed(paths[split], goods_records(split, num, seed))
  return paths


# --- Encoding and batches -------------------------------------------------------------------

def _piece(tokenizer, piece: str, fallback: int) -> int:
  token = tokenizer.token_to_id(piece)
  return token if token is not None and token >= 0 and token != tokenizer.unk_id else fallback


def truncate_pair(a: Sequence[int], b: Sequence[int], budget: int) -> tuple[list, list]:
  """Cuts tokens from the end of the longer of `a`, `b` (of `b` on a tie) until both fit in
  `budget` together; `b` may be empty."""
  a, b = list(a), list(b)
  if budget < (2 if b else 1):
    raise ValueError(f"no room for the text in the row: {budget} tokens left (seq_len)")
  while len(a) + len(b) > budget:
    (a if len(a) > len(b) else b).pop()
  return a, b


class EncodeLabelled:
  """Example index -> a one-segment packing unit (module docstring); a class so grain
  workers can pickle it."""

  def __init__(self, examples: Sequence[Labelled], tokenizer, *, body: str, seq_len: int,
               regression: bool, separator: str = "\n", add_bos: bool = True,
               add_eos: bool = True):
    if body not in BODIES:
      raise ValueError(f"unknown body {body!r} ({' | '.join(BODIES)})")
    if body == "decoder" and add_eos and tokenizer.eos_id == tokenizer.pad_id:
      raise ValueError(
          f"config.data.add_eos: this tokenizer pads with its EOS token (id {tokenizer.eos_id}),"
          " so Hugging Face's *ForSequenceClassification would read a trailing EOS as padding "
          "and score another token than training did; set add_eos=False")
    self._examples, self._tokenizer, self._body = examples, tokenizer, body
    self._seq_len, self._regression = seq_len, regression
    if body == "encoder":
      self._start = [_piece(tokenizer, "[CLS]", tokenizer.bos_id)]
      self._sep = [_piece(tokenizer, "[SEP]", tokenizer.eos_id)]
    else:
      self._start = [tokenizer.bos_id] if add_bos else []
      self._sep = tokenizer.encode(separator) if separator else []
      self._end = [tokenizer.eos_id] if add_eos else []

  def tokens(self, example: Labelled) -> tuple[list[int], list[int]]:
    """(token ids, token type ids) of one example, truncated to `seq_len`."""
    tok = self._tokenizer
    a = tok.encode(example.text)
    b = tok.encode(example.text_b) if example.text_b is not None else []
    pair = example.text_b is not None
    if self._body == "encoder":
      # [CLS] a [SEP] (b [SEP])
      a, b = truncate_pair(a, b, self._seq_len - 2 - int(pair))
      first = self._start + a + self._sep
      second = b + self._sep if pair else []
      return first + second, [0] * len(first) + [1] * len(second)
    middle = self._sep if pair else []
    a, b = truncate_pair(a, b, self._seq_len - len(self._start) - len(middle) - len(self._end))
    ids = self._start + a + middle + b + self._end
    return ids, [0] * len(ids)

  def __call__(self, index: int) -> list[dict]:
    example = self._examples[index]
    ids, types = self.tokens(example)
    n = len(ids)
    pooled = np.zeros(n, np.float32)
    pooled[0 if self._body == "encoder" else n - 1] = 1.0
    label = example.label if example.label is not None else 0
    segment = {"inputs": np.asarray(ids, np.int32), "loss_mask": pooled,
               "labels": np.full(n, label, np.float32 if self._regression else np.int32),
               "example_ids": np.full(n, index, np.int32)}
    if self._body == "encoder":
      segment["token_type_ids"] = np.asarray(types, np.int32)
    return [segment]


def as_units(unit: list[dict], seq_len: int) -> list:
  """`chain.make_batches`'s `to_units` for examples already encoded as one unit."""
  del seq_len
  return [unit]


def batch_fields(body: str, regression: bool) -> dict[str, np.dtype]:
  """The fields of a batch and their dtypes (each `[batch, seq_len]`)."""
  fields = {"inputs": np.int32, "loss_mask": np.float32,
            "labels": np.float32 if regression else np.int32, "example_ids": np.int32,
            "segment_ids": np.int32, "positions": np.int32}
  if body == "encoder":
    fields["token_type_ids"] = np.int32
  return {k: np.dtype(v) for k, v in fields.items()}


def make_classify_dataset(data_config: ml_collections.ConfigDict, tokenizer,
                          examples: Sequence[Labelled], *, body: str, regression: bool,
                          split: str, batch_size: int, shard_index: int = 0,
                          shard_count: int = 1, seed: int = 0, num_epochs: int | None = None,
                          shuffle: bool | None = None) -> grain.IterDataset:
  """One host's batches of labelled examples; each `iter()` starts from the beginning.

  Args:
    data_config: `config.data` (seq_len, packing, pack_bins, shuffle, pair_separator,
      add_bos, add_eos, worker_count).
    tokenizer: data/tokenizer.py Tokenizer or HFTokenizer.
    examples: the split's `Labelled` examples (data/sources.py kind 'labelled').
    body: 'decoder' or 'encoder' (framing and pooled token, module docstring).
    regression: labels are floats.
    split: 'train' (shuffled, repeated forever by default) or another (in order, once).
    batch_size, shard_index, shard_count, seed, num_epochs: as data/chain.py `make_batches`.
    shuffle: override `data_config.shuffle` (predictions read in order).

  Returns:
    Batches of `[batch_size, seq_len]` arrays, the fields of `batch_fields`; short final
    batches are padded with empty rows (loss_mask 0).
  """
  if not examples:
    raise ValueError(f"no labelled examples in the {split} split")
  train = split == "train"
  seq_len = data_config.seq_len
  encode = EncodeLabelled(examples, tokenizer, body=body, seq_len=seq_len,
                          regression=regression,
                          separator=data_config.get("pair_separator", "\n"),
                          add_bos=data_config.add_bos, add_eos=data_config.add_eos)
  return chain.make_batches(
      grain.MapDataset.range(len(examples)),
      shuffle=train and (data_config.shuffle if shuffle is None else shuffle), seed=seed,
      num_epochs=1 if num_epochs is None and not train else num_epochs,
      shard_index=shard_index, shard_count=shard_count, encode=encode,
      to_units=as_units if data_config.get("packing", True) else None, seq_len=seq_len,
      pack_bins=data_config.pack_bins, batch_size=batch_size,
      worker_count=data_config.worker_count)

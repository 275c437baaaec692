"""SFT data: instruction records -> conversations -> chat-template tokens -> packed rows.

    records: tiny-world tasks | JSONL files | a tfds dataset       (Alpaca, ShareGPT; FORMATS.md)
      -> conversations (data/conversation.py; a bad record is a RecordError naming file:line,
         or with `skip_invalid` skipped and counted)
      -> tokens [n] + loss mask [n] (data/chat_template.py: assistant text and its closing
         token supervised; all assistant turns, or with `supervise='last'` only the final one)
      -> truncated to the row (rules below); an example left with no supervised target is
         dropped and counted
      -> shuffle (train) -> repeat [-> mixed with replayed pretraining documents, train only]
      -> shard -> one packing unit per example -> pack -> batch

Truncation. A row holds L = seq_len (input, target) pairs, so an example of n tokens fits
whole iff n <= L + 1. A conversation that does not fit is cut as follows:
  1. Whole turns are kept from the start: the longest run of leading turns that ends with a
     supervised assistant turn and fits; the turns after it are dropped.
  2. If not even the first supervised assistant turn fits whole, the conversation is cut to its
     first L + 1 tokens: the prompt is kept and the tail of that reply is cut (its closing
     token is lost, so this example does not teach stopping).
  3. If what is left has no supervised target (the prompt alone fills the row; or with
     `supervise='last'`, the final turn lies beyond it) the conversation is dropped, counted in
     `SftStats.dropped` and logged; it is never trained on silently.
Turns are never cut at the front: a reply is only learned with the context it was given.

Examples are rendered once per process and split (cached), so the eval iterator that the
loop rebuilds at every evaluation costs no tokenizing, and the drop counts are logged once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from data import chat_template
from data import conversation as conv
from data import packing
from data import records
from data import tiny_tasks
from data.mixture import mix_datasets, replay_data_config
from data.pipeline import PackedIterDataset, _Tokenize, load_texts

FORMATS = ("auto", "alpaca", "sharegpt")
TINY_TASKS = ("alpaca", "sharegpt", "mixed")


@dataclasses.dataclass
class SftStats:
  """What became of the conversations of one split."""
  conversations: int = 0        # parsed
  invalid: int = 0              # malformed records skipped (skip_invalid)
  invalid_reasons: dict = dataclasses.field(default_factory=dict)
  truncated_turns: int = 0      # kept with trailing turns dropped (rule 1)
  truncated_reply: int = 0      # kept with the tail of a reply cut (rule 2)
  dropped: int = 0              # no supervised token left (rule 3)
  examples: int = 0             # kept
  supervised_tokens: int = 0    # supervised targets in the kept examples


# --- Records -> conversations ----------------------------------------------------------------

def check_format(obj: Any, fmt: str) -> None:
  """Raises `InvalidRecord` unless `obj` is a record of `fmt` ('alpaca': has `instruction`,
  single- or multi-turn; 'sharegpt': `conversations` without `instruction`; 'auto': either)."""
  if fmt not in FORMATS:
    raise ValueError(f"config.data.format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "auto" or not isinstance(obj, dict):
    return  # parse_sft reports what is wrong with a non-object
  if fmt == "alpaca" and "instruction" not in obj:
    raise records.InvalidRecord("wrong_format", "config.data.format is 'alpaca' but the "
                                f"record has no 'instruction' (fields: {sorted(obj)})")
  if fmt == "sharegpt" and ("conversations" not in obj or "instruction" in obj):
    raise records.InvalidRecord("wrong_format", "config.data.format is 'sharegpt': expected "
                                f"'conversations' and no 'instruction' (fields: {sorted(obj)})")


def parse_record(obj: Any, fmt: str = "auto") -> conv.Conversation:
  """A JSON record (Alpaca or ShareGPT, checked against `fmt`) as a conversation."""
  check_format(obj, fmt)
  return conv.parse_sft(obj)


def _plain(value: Any) -> Any:
  """A tfds example as JSON-like Python: bytes -> str, arrays -> lists, and a sequence of
  dicts (which tfds stores as a dict of equal-length lists) -> a list of dicts."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return _plain(value.tolist()) if value.ndim else _plain(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    out = {k: _plain(v) for k, v in value.items()}
    lists = list(out.values())
    if lists and all(isinstance(v, list) for v in lists) and len({len(v) for v in lists}) == 1:
      return [dict(zip(out, row)) for row in zip(*lists)]
    return out
  return value


def _top_level(example: dict) -> dict:
  # Only nested features are transposed; the record itself stays a dict.
  return {k: _plain(v) for k, v in example.items()}


def _tfds_conversations(data_config, split: str, counter: records.SkipCounter) -> list:
  import tensorflow_datasets as tfds  # heavy; only for source='tfds'
  name, tfds_split = data_config.tfds_name, (data_config.train_split if split == "train"
                                             else data_config.eval_split)
  source = tfds.data_source(name, split=tfds_split, data_dir=data_config.tfds_data_dir or None)
  where = f"tfds:{name}/{tfds_split}"
  out = []
  for index in range(len(source)):
    try:
      out.append(parse_record(_top_level(source[index]), data_config.format))
    except records.InvalidRecord as e:
      # The record's 1-based index plays the part of a line number.
      error = records.RecordError(where, index + 1, e.reason, e.detail)
      if not data_config.skip_invalid:
        raise error from None
      counter.add(error.reason)
  return out


def _tiny_records(data_config, split: str) -> list:
  """The tiny-world SFT records of `split`: Alpaca, ShareGPT or both interleaved."""
  task = data_config.tiny_task
  num = (data_config.tiny_task_train_records if split == "train"
         else data_config.tiny_task_eval_records)
  tw_split = "train" if split == "train" else "validation"
  if task != "mixed":
    return tiny_tasks.KINDS[task](tw_split, num)
  return _interleave(tiny_tasks.alpaca_records(tw_split, num - num // 2),
                     tiny_tasks.sharegpt_records(tw_split, num // 2))


def _interleave(first: list, second: list) -> list:
  """first[0], second[0], first[1], ...; `first` may be one longer."""
  return [r for pair in zip(first, second) for r in pair] + first[len(second):]


def load_conversations(data_config: ml_collections.ConfigDict, split: str,
                       workdir: str | None = None,
                       counter: records.SkipCounter | None = None) -> list:
  """The conversations of `split` ('train' | 'eval') of `data_config.source`.

  Source 'tiny_world' writes the tiny tasks to `{workdir}/data/tiny_{kind}-{split}.jsonl`
  and reads them back like any JSONL file (in memory without a workdir); 'files' reads
  `train_files` / `eval_files` globs of JSONL; 'tfds' reads a prepared tfds dataset whose
  features are the record's fields (a ShareGPT `conversations` is a Sequence of
  {from, value}), naming a bad record by its 1-based index.

  Raises:
    RecordError: a malformed record (file and line), unless `data_config.skip_invalid`, in
      which case it is counted in `counter`.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  counter = records.SkipCounter() if counter is None else counter
  parse = functools.partial(parse_record, fmt=data_config.format)
  read = lambda patterns: list(records.iter_jsonl_records(
      patterns, parse, skip_invalid=data_config.skip_invalid, counter=counter))
  if data_config.source == "tiny_world":
    if data_config.tiny_task not in TINY_TASKS:
      raise ValueError(f"config.data.tiny_task must be one of {TINY_TASKS}, got "
                       f"{data_config.tiny_task!r}")
    if not workdir:
      return [parse(r) for r in _tiny_records(data_config, split)]
    files = _tiny_files(os.path.join(workdir, "data"), data_config.tiny_task,
                        data_config.tiny_task_train_records, data_config.tiny_task_eval_records)
    # 'mixed': the Alpaca and ShareGPT files interleaved, as in memory.
    return _interleave(*[read(path) for path in files[split]]) if len(files[split]) == 2 else (
        read(files[split][0]))
  if data_config.source == "files":
    patterns = data_config.train_files if split == "train" else data_config.eval_files
    if not patterns:
      raise ValueError(f"config.data.{split}_files is empty")
    return read(patterns)
  if data_config.source == "tfds":
    return _tfds_conversations(data_config, split, counter)
  raise ValueError(f"unknown config.data.source {data_config.source!r}: "
                   "tiny_world, files, tfds")


def _tiny_files(out_dir: str, task: str, num_train: int, num_eval: int) -> dict:
  """{'train': [paths], 'eval': [paths]} of the tiny tasks written under `out_dir`."""
  kinds = ("alpaca", "sharegpt") if task == "mixed" else (task,)
  sizes = {"alpaca": (num_train - num_train // 2, num_eval - num_eval // 2),
           "sharegpt": (num_train // 2, num_eval // 2)} if task == "mixed" else {
               task: (num_train, num_eval)}
  paths = {kind: tiny_tasks.ensure_tiny_tasks(out_dir, kind, *sizes[kind]) for kind in kinds}
  return {"train": [paths[k]["train"] for k in kinds],
          "eval": [paths[k]["validation"] for k in kinds]}


# --- Conversations -> truncated examples -------------------------------------------------------

def render_turns(tokenizer, conversation: Sequence[conv.Turn], template: str, supervise: str
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """`chat_template.render` plus where each turn ends.

  Returns:
    tokens `[n]` int32, loss_mask `[n]` float32 (equal to `render(...)`'s: rendering is
    piecewise, so a conversation is its BOS followed by its turns rendered one by one), and
    `ends[i]`, the number of tokens up to the end of turn i.
  """
  if supervise not in ("all", "last"):
    raise ValueError(f"supervise must be 'all' or 'last', got {supervise!r}")
  last = max((i for i, t in enumerate(conversation) if t.role == "assistant"), default=-1)
  tokens, mask, ends = [tokenizer.bos_id], [0.0], []
  for i, turn in enumerate(conversation):
    piece = chat_template.render(tokenizer, (turn,), template, add_bos=False)
    tokens += piece.tokens.tolist()
    supervised = supervise == "all" or i == last
    mask += (piece.loss_mask if supervised else np.zeros_like(piece.loss_mask)).tolist()
    ends.append(len(tokens))
  return np.asarray(tokens, np.int32), np.asarray(mask, np.float32), ends


def truncate(tokens: np.ndarray, loss_mask: np.ndarray, ends: Sequence[int], seq_len: int
             ) -> tuple[str, np.ndarray, np.ndarray]:
  """Applies the module's truncation rules to one rendered conversation.

  Args:
    tokens, loss_mask: `[n]` from `render_turns`.
    ends: token count at the end of each turn.
    seq_len: row length L; an example may keep L + 1 tokens.

  Returns:
    (outcome, tokens, loss_mask): outcome 'whole', 'turns' (trailing turns dropped),
    'reply' (a reply's tail cut) or 'dropped' (no supervised target left; arrays empty).
  """
  limit = seq_len + 1
  if len(tokens) <= limit:
    outcome, keep = "whole", len(tokens)
  else:
    starts = [1] + list(ends[:-1])
    fitting = [end for start, end in zip(starts, ends)
               if end <= limit and loss_mask[start:end].any()]
    outcome, keep = ("turns", fitting[-1]) if fitting else ("reply", limit)
  # Token 0 is never a target, so only mask[1:] counts.
  if keep < 2 or not loss_mask[1:keep].any():
    return "dropped", tokens[:0], loss_mask[:0]
  return outcome, tokens[:keep], loss_mask[:keep]


def render_examples(tokenizer, conversations: Sequence[conv.Conversation], *, template: str,
                    supervise: str, seq_len: int, stats: SftStats | None = None) -> list:
  """Renders and truncates conversations; returns `(tokens, loss_mask)` pairs of those kept
  and fills `stats` (conversations, truncated_*, dropped, examples, supervised_tokens)."""
  stats = SftStats() if stats is None else stats
  out = []
  for conversation in conversations:
    stats.conversations += 1
    outcome, tokens, mask = truncate(*render_turns(tokenizer, conversation, template, supervise),
                                     seq_len)
    if outcome == "dropped":
      stats.dropped += 1
      continue
    stats.truncated_turns += outcome == "turns"
    stats.truncated_reply += outcome == "reply"
    stats.examples += 1
    stats.supervised_tokens += int(mask[1:].sum())
    out.append((tokens, mask))
  return out


def sft_units(example: tuple[np.ndarray, np.ndarray], seq_len: int) -> list:
  """An example as packing units of `inputs = tokens[:-1]`, `targets = tokens[1:]`,
  `loss_mask = mask[1:]` (the mask of the token being predicted).

  A rendered SFT example (at most `seq_len + 1` tokens after `truncate`) is one unit; a
  longer replay document is cut into causal chunks overlapping by one token, as in CLM
  (data/packing.py), each its own unit.
  """
  tokens, mask = example
  units = []
  for start in range(0, len(tokens) - 1, seq_len):
    chunk, chunk_mask = tokens[start:start + seq_len + 1], mask[start:start + seq_len + 1]
    units.append([{"inputs": chunk[:-1], "targets": chunk[1:],
                   "loss_mask": np.asarray(chunk_mask[1:], np.float32)}])
  return units


class _ReplayExample:
  """Text -> (tokens, all-ones mask): a replayed pretraining document, every token a target.
  A class, not a lambda, so grain worker processes can pickle it."""

  def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
    self._tokenize = _Tokenize(tokenizer, add_bos, add_eos)

  def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = self._tokenize(text)
    return tokens, np.ones(len(tokens), np.float32)


def replay_examples(data_config: ml_collections.ConfigDict, tokenizer, *, seed: int,
                    num_epochs: int | None, workdir: str | None) -> grain.MapDataset:
  """The replay corpus (`config.data.replay_*`, data/mixture.py) as shuffled, repeated
  `(tokens, ones)` examples: plain next-token prediction on pretraining text, mixed into SFT
  to limit forgetting what the base model knew."""
  texts = load_texts(replay_data_config(data_config), "train", workdir)
  if not len(texts):
    raise ValueError(f"no documents in the replay corpus {data_config.replay_source!r}")
  ds = grain.MapDataset.source(texts)
  if data_config.shuffle:
    ds = ds.shuffle(seed=seed + 1)
  return ds.repeat(num_epochs).map(_ReplayExample(tokenizer, data_config.add_bos,
                                                  data_config.add_eos))


@functools.lru_cache(maxsize=4)
def _cached_examples(tokenizer, data_config: ml_collections.FrozenConfigDict, split: str,
                     workdir: str | None) -> tuple[tuple, SftStats]:
  counter = records.SkipCounter()
  conversations = load_conversations(data_config, split, workdir, counter)
  stats = SftStats(invalid=counter.skipped, invalid_reasons=dict(counter.reasons))
  examples = render_examples(tokenizer, conversations, template=data_config.chat_template,
                             supervise=data_config.supervise, seq_len=data_config.seq_len,
                             stats=stats)
  logging.info("SFT %s data: %s", split, stats)
  if stats.dropped or stats.invalid:
    logging.warning("SFT %s data: %d conversations dropped (no supervised token within "
                    "seq_len %d), %d invalid records skipped %s", split, stats.dropped,
                    data_config.seq_len, stats.invalid, stats.invalid_reasons)
  return tuple(examples), stats


def load_examples(data_config: ml_collections.ConfigDict, tokenizer, split: str,
                  workdir: str | None = None) -> tuple[tuple, SftStats]:
  """The rendered, truncated `(tokens, loss_mask)` examples of `split` and their stats
  (computed once per process for the same config, tokenizer and split)."""
  return _cached_examples(tokenizer, ml_collections.FrozenConfigDict(data_config), split,
                          workdir)


def make_sft_dataset(data_config: ml_collections.ConfigDict, tokenizer, *, split: str,
                     batch_size: int, shard_index: int = 0, shard_count: int = 1,
                     seed: int = 0, num_epochs: int | None = None,
                     workdir: str | None = None) -> grain.IterDataset:
  """Packed SFT batches of one data shard, as `data.pipeline.make_clm_dataset` (same
  arguments, shuffling, sharding, resumable state and batch layout: `inputs`, `targets`,
  `segment_ids`, `positions`, `loss_mask` `[batch_size, seq_len]`), one segment per example
  with its loss mask on the supervised targets only.

  With `data_config.replay_source` and `0 < replay_weight < 1`, that share of the training
  examples are documents of the replay corpus (loss on every token), interleaved with the
  conversations in a fixed pattern before sharding (data/mixture.py); eval is SFT only."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  examples, _ = load_examples(data_config, tokenizer, split, workdir)
  if not examples:
    raise ValueError(f"no SFT example left in the {split} split of {data_config.source!r}")
  train = split == "train"
  ds = grain.MapDataset.source(list(examples))
  if train and data_config.shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs is None and not train:
    num_epochs = 1  # eval is a fixed set
  ds = ds.repeat(num_epochs)  # None: forever
  weight = float(data_config.get("replay_weight", 0.0))
  if train and data_config.get("replay_source") and weight > 0:
    ds = mix_datasets([ds, replay_examples(data_config, tokenizer, seed=seed,
                                           num_epochs=num_epochs, workdir=workdir)],
                      [1.0 - weight, weight])
  ds = ds[shard_index::shard_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=256))
  ds = PackedIterDataset(ds, data_config.seq_len, data_config.pack_bins, to_units=sft_units)
  ds = ds.batch(batch_size, batch_fn=functools.partial(packing.stack_rows,
                                                       batch_size=batch_size))
  if data_config.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return ds


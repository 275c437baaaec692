"""SFT data: instruction records -> conversations -> chat-template tokens -> packed rows.

    records: tiny-world tasks | JSONL files | a tfds dataset  (Alpaca, ShareGPT; docs/formats.md)
      -> conversations (data/sources.py, data/conversation.py; a bad record is a RecordError
         naming file:line, or with `skip_invalid` skipped and counted)
      -> tokens [n] + loss mask [n] (data/chat_template.py: assistant text and its closing
         token supervised; all assistant turns, or with `supervise='last'` only the final one)
      -> truncated to the row (rules below); an example left with no supervised target is
         dropped and counted
      -> data/chain.py: shuffle (train) -> repeat [-> mixed with replayed pretraining
         documents, train only] -> shard -> one packing unit per example -> pack -> batch

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
from typing import Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from data import chain
from data import chat_template
from data import conversation as conv
from data import records
from data import sources
from data.mixture import replay_data_config
from data.pipeline import Tokenize, load_texts


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

def load_conversations(data_config: ml_collections.ConfigDict, split: str,
                       workdir: str | None = None,
                       counter: records.SkipCounter | None = None) -> list:
  """The conversations of `split` ('train' | 'eval') of `data_config.source`
  (`sources.load_records` of kind 'conversations').

  Source 'tiny_world' writes the tiny tasks (`config.data.tiny_task`: alpaca | sharegpt |
  mixed, the two interleaved) to `{workdir}/data/tiny_{kind}-{split}.jsonl` and reads them
  back like any JSONL file (in memory without a workdir); 'files' reads `train_files` /
  `eval_files` globs of JSONL; 'tfds' reads a prepared tfds dataset whose features are the
  record's fields (a ShareGPT `conversations` is a Sequence of {from, value}), naming a bad
  record by its 1-based index. Records are checked against `config.data.format`.

  Raises:
    RecordError: a malformed record (file and line), unless `data_config.skip_invalid`, in
      which case it is counted in `counter`.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  return sources.load_records(data_config, "conversations", split, workdir, counter=counter)


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
    self._tokenize = Tokenize(tokenizer, add_bos, add_eos)

  def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = self._tokenize(text)
    return tokens, np.ones(len(tokens), np.float32)


def replay_examples(data_config: ml_collections.ConfigDict, tokenizer, *,
                    workdir: str | None) -> grain.MapDataset:
  """The replay corpus (`config.data.replay_*`, data/mixture.py) as `(tokens, ones)`
  examples, a chain stream: plain next-token prediction on pretraining text, mixed into SFT
  to limit forgetting what the base model knew."""
  texts = load_texts(replay_data_config(data_config), "train", workdir)
  if not len(texts):
    raise ValueError(f"no documents in the replay corpus {data_config.replay_source!r}")
  return grain.MapDataset.source(texts).map(_ReplayExample(tokenizer, data_config.add_bos,
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
  examples, _ = load_examples(data_config, tokenizer, split, workdir)
  if not examples:
    raise ValueError(f"no SFT example left in the {split} split of {data_config.source!r}")
  train = split == "train"
  streams, weights = [grain.MapDataset.source(list(examples))], None
  weight = float(data_config.get("replay_weight", 0.0))
  if train and data_config.get("replay_source") and weight > 0:
    # The replay stream is shuffled with seed + 1 (data/chain.py), as in data/mixture.py.
    streams.append(replay_examples(data_config, tokenizer, workdir=workdir))
    weights = [1.0 - weight, weight]
  return chain.make_batches(
      streams, weights=weights, shuffle=train and data_config.shuffle, seed=seed,
      num_epochs=1 if num_epochs is None and not train else num_epochs,  # eval: a fixed set
      shard_index=shard_index, shard_count=shard_count, to_units=sft_units,
      seq_len=data_config.seq_len, pack_bins=data_config.pack_bins, batch_size=batch_size,
      worker_count=data_config.worker_count)

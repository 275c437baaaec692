"""Preference data for the reward-model and DPO-family stages: records -> two-segment units.

    records (data/sources.py: tiny world | JSONL files)  -> PreferencePair | Feedback, 0..N-1
      -> data/chain.py over the indices: (train: shuffle, repeat) -> shard -> encode each
         example as one *unit* of two segments -> pack (data/packing.py; a unit never
         straddles rows), or one unit per row without `config.data.packing` -> batch

A pair becomes [chosen, rejected]; a KTO example becomes [completion, mismatched], where the
mismatched segment is the same prompt with the completion of example (i + 1) mod N, for
KTO's KL reference point (objectives/kto.py). Each segment is prompt tokens (chat template,
`render_prompt`) followed by completion tokens (`render_completion`, closing token included),
with per-token fields (segment constants, zero on padding):

    sides            int32   1 on the first segment, 2 on the second (objectives/pairs.py)
    example_ids      int32   the example's index in its split: key of the reference cache
    margins          float32 preference pairs: the record's margin (0 when absent)
    desirable        float32 KTO: 1 if the example is desirable
    reference_logps  float32 when a reference table [N, 2] is given: that segment's cached
                     log pi_ref(y|x) (training/stages/reference_cache.py)

Log-prob stages (`shift=True`) take `inputs = tokens[:-1]`, `targets = tokens[1:]` and
`loss_mask` 1 on completion targets. The reward model (`shift=False`) reads the whole sequence,
`inputs = tokens`, so the state at its last token (the closing token) has seen all of it;
`loss_mask` then marks the completion tokens and `targets` are unused (0).

Truncation: both segments of a unit must share one row, so each is cut to at most
`seq_len // 2` positions. When prompt + longest completion is too long, the prompt loses its
oldest tokens first (its first token, BOS, is kept) but keeps at least half the budget; then
completions are cut at the end. Both segments keep the same prompt.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import grain
import ml_collections
import numpy as np

from data import chain
from data import sources
from data.chat_template import render_completion, render_prompt
from data.conversation import PreferencePair
from data.records import SkipCounter, expand_patterns

RECORD_KINDS = ("preferences", "feedback")
SIDE_FIRST, SIDE_SECOND = 1, 2


def truncate(prompt: Sequence[int], completions: Sequence[Sequence[int]],
             budget: int) -> tuple[list, list]:
  """Cuts `prompt + completion` to at most `budget` tokens for every completion (see the
  module docstring); returns the kept prompt and completions."""
  prompt, completions = list(prompt), [list(c) for c in completions]
  longest = max(len(c) for c in completions)
  if len(prompt) + longest > budget:
    keep = min(len(prompt), max(budget - longest, budget // 2))
    prompt = prompt[:1] + prompt[len(prompt) - keep + 1:] if keep > 1 else prompt[:keep]
  return prompt, [c[:max(budget - len(prompt), 0)] for c in completions]


def encode_unit(prompt: Sequence[int], completions: Sequence[Sequence[int]], *, seq_len: int,
                shift: bool, fields: dict[str, tuple]) -> list[dict]:
  """Two segments sharing `prompt`, one per completion, with per-segment constant `fields`.

  Args:
    prompt: prompt token ids (with BOS and the assistant header).
    completions: the two completions' token ids.
    seq_len: row length; each segment gets at most `seq_len // 2` positions.
    shift: next-token layout (inputs / targets shifted by one) or whole-sequence layout.
    fields: name -> ((first segment's value, second's), numpy dtype).
  """
  prompt, completions = truncate(prompt, completions, seq_len // 2 + int(shift))
  unit = []
  for side, completion in enumerate(completions):
    tokens = np.asarray(prompt + completion, np.int32)
    completion_mask = np.arange(len(tokens)) >= len(prompt)
    if shift:
      segment = {"inputs": tokens[:-1], "targets": tokens[1:],
                 "loss_mask": completion_mask[1:].astype(np.float32)}
    else:
      segment = {"inputs": tokens, "targets": np.zeros_like(tokens),
                 "loss_mask": completion_mask.astype(np.float32)}
    n = len(segment["inputs"])
    segment["sides"] = np.full(n, (SIDE_FIRST, SIDE_SECOND)[side], np.int32)
    for name, (values, dtype) in fields.items():
      segment[name] = np.full(n, values[side], dtype)
    unit.append(segment)
  return unit


class EncodeExample:
  """Example index -> its two-segment unit; a class so grain workers can pickle it."""

  def __init__(self, examples: Sequence, tokenizer, *, template: str, seq_len: int,
               shift: bool, reference: np.ndarray | None = None):
    self._examples, self._tokenizer, self._template = examples, tokenizer, template
    self._seq_len, self._shift, self._reference = seq_len, shift, reference

  def __call__(self, index: int) -> list[dict]:
    example = self._examples[index]
    prompt = render_prompt(self._tokenizer, example.context, self._template)
    fields = {"example_ids": ((index, index), np.int32)}
    if isinstance(example, PreferencePair):
      texts = (example.chosen, example.rejected)
      margin = 0.0 if example.margin is None else example.margin
      fields["margins"] = ((margin, margin), np.float32)
    else:
      mismatched = self._examples[(index + 1) % len(self._examples)].completion
      texts = (example.completion, mismatched)
      fields["desirable"] = ((float(example.desirable),) * 2, np.float32)
    if self._reference is not None:
      fields["reference_logps"] = (tuple(self._reference[index]), np.float32)
    completions = [render_completion(self._tokenizer, t, self._template) for t in texts]
    return encode_unit(prompt, completions, seq_len=self._seq_len, shift=self._shift,
                       fields=fields)


def as_units(unit: list[dict], seq_len: int) -> list:
  """`chain.make_batches`'s `to_units` for examples already encoded as one unit."""
  del seq_len
  return [unit]


@functools.lru_cache(maxsize=16)
def _read(parts: tuple, kind: str, skip_invalid: bool, stamp: tuple) -> tuple:
  del stamp  # part of the cache key only: a rewritten file is read again
  counter = SkipCounter()
  examples = tuple(sources.read_files(parts, kind, skip_invalid=skip_invalid, counter=counter))
  return examples, counter


def load_examples(data_config: ml_collections.ConfigDict, kind: str, split: str,
                  workdir: str | None = None) -> tuple[tuple, SkipCounter]:
  """The examples of `split` in file order, and how many invalid records were skipped
  (read once per process while the files are unchanged: the reference pass and every eval
  iterator read them again).

  Args:
    data_config: `config.data` (source, files, tiny_task sizes, skip_invalid).
    kind: 'preferences' (PreferencePair) or 'feedback' (Feedback).
    split: 'train', 'eval' or 'pairs_eval': the held-out preference pairs on which the
      implicit reward is scored (for KTO, whose own eval split is unpaired feedback:
      `config.data.pairs_eval_files`, or the tiny world's held-out pairs).
    workdir: where source 'tiny_world' writes its task records (data/sources.py).

  Raises:
    RecordError: a bad record (naming file and line), unless `data_config.skip_invalid`.
  """
  if kind not in RECORD_KINDS:
    raise ValueError(f"unknown preference record kind {kind!r}; choose one of {RECORD_KINDS}")
  if split == "pairs_eval":
    kind, split = "preferences", ("eval" if kind == "preferences" else "pairs_eval")
  parts = tuple(sources.record_files(data_config, kind, split, workdir))
  stamp = tuple((p, os.path.getmtime(p), os.path.getsize(p))
                for part in parts for p in expand_patterns(part))
  examples, counter = _read(parts, kind, bool(data_config.skip_invalid), stamp)
  if not examples:
    raise ValueError(f"no valid {kind} records in {','.join(parts)}")
  return examples, counter


def make_preference_dataset(data_config: ml_collections.ConfigDict, tokenizer, *, kind: str,
                            split: str, batch_size: int, shift: bool, shard_index: int = 0,
                            shard_count: int = 1, seed: int = 0, num_epochs: int | None = None,
                            workdir: str | None = None, reference: np.ndarray | None = None,
                            shuffle: bool | None = None) -> grain.IterDataset:
  """One host's batches of preference (or KTO) units; each `iter()` starts from the start.

  Args:
    data_config: `config.data` (seq_len, chat_template, packing, pack_bins, shuffle, ...).
    tokenizer: data/tokenizer.py Tokenizer with the chat symbols.
    kind: 'preferences' or 'feedback'.
    split: 'train' (shuffled, repeated forever by default), 'eval' or 'pairs_eval' (file
      order, one pass).
    batch_size: rows per batch from this shard.
    shift: next-token layout (DPO family, KTO) or whole sequences (reward model).
    shard_index: this shard, in [0, shard_count).
    shard_count: shards sharing the examples (example k goes to shard k mod shard_count).
    seed: shuffle seed.
    num_epochs: passes over the examples (None: forever for 'train', once otherwise).
    workdir: for source 'tiny_world'.
    reference: `[N, 2]` cached reference log-probs of this split's examples, or None.
    shuffle: override `data_config.shuffle` (the reference pass reads in order).

  Returns:
    Batches of `[batch_size, seq_len]` arrays: inputs, targets, loss_mask, segment_ids,
    positions and the per-token fields of the module docstring; short final batches are
    padded with empty rows.
  """
  examples, _ = load_examples(data_config, kind, split, workdir)
  if reference is not None and len(reference) != len(examples):
    raise ValueError(f"reference table has {len(reference)} rows for {len(examples)} examples")
  train = split == "train"
  seq_len = data_config.seq_len
  return chain.make_batches(
      grain.MapDataset.range(len(examples)),
      shuffle=train and (data_config.shuffle if shuffle is None else shuffle), seed=seed,
      num_epochs=1 if num_epochs is None and not train else num_epochs,
      shard_index=shard_index, shard_count=shard_count,
      encode=EncodeExample(examples, tokenizer, template=data_config.chat_template,
                           seq_len=seq_len, shift=shift, reference=reference),
      to_units=as_units if data_config.packing else None, seq_len=seq_len,
      pack_bins=data_config.pack_bins, batch_size=batch_size,
      worker_count=data_config.worker_count)

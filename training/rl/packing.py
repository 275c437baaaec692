"""Packed updates: the episodes of an RL minibatch packed into rows with segment ids.

The rollout's rows (training/rl/rollout.py) are `[B, P + T]`: every prompt left-padded to P,
every reply padded to T. An episode, though, is only its prompt's real tokens and its reply;
with short prompts or replies most of a row is padding that the update's forward and backward
passes still pay for. With `config.rl.pack_updates` each minibatch's episodes are packed
first-fit-decreasing into rows of S = P + T tokens (every episode fits one) by the packer of
the supervised stages (data/packing.py `FirstFitPacker`): each episode one segment, its
positions counting from 0 as in its own row, and attention never crossing a segment, so every
token's log-prob, value and entropy are those of the unpacked row (up to float rounding: the
layout differs).

Layout of a packed minibatch of R rows (R rounded up to a multiple of `multiple`, the ways the
batch splits over the mesh, with empty rows):

    tokens, positions, segment_ids   `[R, S]`      as in data/packing.py
    every per-reply-token array      `[R, S - 1]`  column j: the token at column j + 1, i.e.
                                     the target of input column j; 0 on prompts and padding
    budget                           `[R, 1]`      T, the constant level's L (objectives/grpo.py)

The per-token arrays are aligned to the targets of `tokens[:, :-1]`, so training/rl/policy.py
`policy_outputs(model, batch, S - 1)` (all positions) gives log-probs and values that line up
with them, exactly as `[B, T]` arrays line up with the last T positions of unpacked rows; a
loss tells the two apart by `budget`. Episodes whose reply mask is all 0 (dynamic sampling's
filler groups) weigh nothing in any loss and are left out. With tool episodes
(training/rl/episodes.py) an episode's reply region holds the tools' tokens too: they are
packed with it, masked as in its row.

`pack_efficiency` = real tokens / row slots of the update batches (packed or not), the share
of the update's compute that is not padding.
"""

from __future__ import annotations

import numpy as np

from data.packing import FirstFitPacker, empty_row

ROW_FIELDS = ("tokens", "positions", "segment_ids")


def split_fields(arrays: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
  """(row fields `[B, P + T]`, per-reply-token fields `[B, T]`) of a make_batch result."""
  width = arrays["mask"].shape[1]
  token_fields = [k for k in arrays if k not in ROW_FIELDS]
  for k in token_fields:
    if arrays[k].ndim != 2 or arrays[k].shape[1] != width:
      raise ValueError(f"packed updates: {k} has shape {arrays[k].shape}; every array but "
                       f"{ROW_FIELDS} must be per reply token, [rows, {width}]")
  return list(ROW_FIELDS), token_fields


def real_tokens(arrays: dict[str, np.ndarray], index: np.ndarray) -> int:
  """Prompt and reply tokens (not padding) of rows `index`."""
  return int((arrays["segment_ids"][index] > 0).sum())


def pack_episodes(arrays: dict[str, np.ndarray], index: np.ndarray, *, multiple: int
                  ) -> dict[str, np.ndarray]:
  """The episodes of rows `index` packed into rows (module docstring).

  Args:
    arrays: a make_batch result: `tokens`, `positions`, `segment_ids` `[B, P + T]` (prompts
      left-padded to P, then the reply), `mask` and other per-reply-token arrays `[B, T]`.
    index: the rows of this minibatch, in order.
    multiple: the packed row count is rounded up to a multiple of this.
  Returns:
    the packed minibatch, numpy.
  """
  _, token_fields = split_fields(arrays)
  width = arrays["tokens"].shape[1]
  t = arrays["mask"].shape[1]
  p = width - t
  episodes = []
  for b in index:
    if not np.any(arrays["mask"][b]):
      continue
    # The reply region's real tokens (with tools also the environment's, masked out of the
    # loss: training/rl/episodes.py) follow the prompt's without a gap.
    prompt = int(np.count_nonzero(arrays["segment_ids"][b, :p]))
    reply = int(np.count_nonzero(arrays["segment_ids"][b, p:]))
    start = p - prompt
    if not np.all(arrays["segment_ids"][b, start:p + reply]):
      raise ValueError(f"row {b}: prompt and reply tokens must be contiguous (left-padded "
                       "prompt, then the reply)")
    n = prompt + reply
    segment = {"inputs": arrays["tokens"][b, start:p + reply]}
    for k in token_fields:
      field = np.zeros(n, arrays[k].dtype)
      field[prompt:] = arrays[k][b, :reply]
      segment[k] = field
    episodes.append([segment])
  # First-fit decreasing (stable: ties keep minibatch order), every row open at once.
  episodes.sort(key=lambda unit: -len(unit[0]["inputs"]))
  packer = FirstFitPacker(width, max(len(episodes), 1))
  for unit in episodes:
    packer.add(unit)
  rows = packer.flush()
  like = rows[0] if rows else empty_row(width, like={"inputs": np.zeros(0, np.int32),
                                                     **{k: np.zeros(0, arrays[k].dtype)
                                                        for k in token_fields}})
  count = max(-(-len(rows) // multiple), 1) * multiple
  rows += [empty_row(width, like=like) for _ in range(count - len(rows))]
  stacked = {k: np.stack([r[k] for r in rows]) for k in like}
  out = {"tokens": stacked.pop("inputs").astype(np.int32),
         "positions": stacked.pop("positions").astype(np.int32),
         "segment_ids": stacked.pop("segment_ids").astype(np.int32)}
  out.update({k: stacked[k][:, 1:] for k in token_fields})
  out["budget"] = np.full((count, 1), t, np.float32)
  return out


def is_packed(batch) -> bool:
  """Whether a minibatch is packed (`pack_episodes`): it carries the generation budget."""
  return "budget" in batch

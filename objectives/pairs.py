"""Per-sequence values from packed rows, and the two-segment layout of preference rows.

Rows hold sequences as segments (`segment_ids` 1, 2, ... in a row; 0 on padding). A row of L
tokens holds at most L segments, so per-segment values fit an `[batch, L]` array whose column
s - 1 belongs to segment s: everything below is O(batch * length), however many sequences are
packed, and needs no static bound on sequences per row.

Preference stages pack each example as a *unit of two consecutive segments*
(data/preferences.py): in every row, segment 2k + 1 is the first sequence of the row's k-th
example (the chosen answer, or KTO's completion) and segment 2k + 2 its partner (the rejected
answer, or KTO's mismatched completion for the KL estimate). A per-token `sides` field (1 on the
first, 2 on the second, 0 on padding) says which is which, so the layout is checked, not
assumed: `pair_mask` holds only for slots whose two segments carry sides 1 and 2.

    segment_sums     values [B, L] -> per-segment sums [B, L]
    last_token_mask  segment_ids -> [B, L] True at each segment's last token
    segment_last     values [B, L] -> per-segment value at its last token [B, L]
    split_pairs      per-segment [B, L] -> (first [B, P], second [B, P]), P = ceil(L / 2)
    pair_mask        sides, segment_ids -> [B, P] True where slot k holds a real example
    sequence_log_probs  per-token log-probs -> per-pair sums and completion lengths
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Sums `values` over the tokens of each segment, row by row.

  Args:
    values: `[batch, length]` float or int.
    segment_ids: `[batch, length]` int, 1, 2, ... per segment, 0 on padding (ignored).

  Returns:
    `[batch, length]`, float32 (integers stay integers, e.g. exact example ids): column
    s - 1 holds the sum over segment s (0 if absent).
  """
  length = values.shape[-1]
  if not jnp.issubdtype(values.dtype, jnp.integer):
    values = values.astype(jnp.float32)
  # Padding goes to an extra bucket that is dropped; vmapping keeps the batch dimension a
  # batch dimension of the scatter, so a batch-sharded input stays sharded.
  index = jnp.where(segment_ids > 0, segment_ids - 1, length).astype(jnp.int32)
  per_row = lambda v, i: jax.ops.segment_sum(v, i, num_segments=length + 1)[:length]
  return jax.vmap(per_row)(values, index)


def last_token_mask(segment_ids: jax.Array) -> jax.Array:
  """`[batch, length]` bool: True at the last token of each segment (never on padding)."""
  following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
  return (segment_ids > 0) & (following != segment_ids)


def segment_last(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Each segment's value at its last token, `[batch, length]` (column s - 1: segment s).

  Reads a sequence's reward at its last real token, or a per-segment constant carried on
  every token (a margin, an example id, a cached reference log-prob).
  """
  values = jnp.asarray(values)
  return segment_sums(jnp.where(last_token_mask(segment_ids), values, jnp.zeros_like(values)),
                      segment_ids)


def split_pairs(per_segment: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-segment `[batch, length]` -> (first `[batch, P]`, second `[batch, P]`).

  Slot k pairs segment 2k + 1 (first) with segment 2k + 2 (second); P = ceil(length / 2).
  """
  length = per_segment.shape[-1]
  padded = jnp.pad(per_segment, ((0, 0), (0, length % 2)))
  pairs = padded.reshape(padded.shape[0], -1, 2)
  return pairs[..., 0], pairs[..., 1]


def pair_mask(sides: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """`[batch, P]` bool: slot k holds an example (segment 2k+1 has side 1, 2k+2 side 2).

  Args:
    sides: `[batch, length]` int per-token field: 1 on an example's first sequence, 2 on its
      second, 0 on padding.
    segment_ids: `[batch, length]` int.
  """
  first, second = split_pairs(segment_last(sides, segment_ids))
  return (first == 1) & (second == 2)


class PairSequences(NamedTuple):
  """Per-example sums over completion tokens, `[batch, P]` each (see `sequence_log_probs`)."""
  first: jax.Array           # sum of log-probs of the first sequence's completion
  second: jax.Array          # ... of the second sequence's
  first_tokens: jax.Array    # completion tokens summed over (float32)
  second_tokens: jax.Array


def sequence_log_probs(token_log_probs: jax.Array, loss_mask: jax.Array,
                       segment_ids: jax.Array) -> PairSequences:
  """Sequence log-probs log pi(y|x) = sum_t mask_t log pi(y_t | x, y_<t), per pair slot.

  Args:
    token_log_probs: `[batch, length]` log-prob of each target (objectives/clm.py
      `token_log_probs`), float32.
    loss_mask: `[batch, length]`, 1 on completion targets (prompt and padding 0).
    segment_ids: `[batch, length]` int.

  Returns:
    `PairSequences` of `[batch, P]` float32 arrays; masked tokens add nothing even if their
    log-prob is inf or nan.
  """
  mask = loss_mask.astype(jnp.float32)
  values = jnp.where(mask > 0, token_log_probs.astype(jnp.float32) * mask, 0.0)
  first, second = split_pairs(segment_sums(values, segment_ids))
  first_tokens, second_tokens = split_pairs(segment_sums(mask, segment_ids))
  return PairSequences(first, second, first_tokens, second_tokens)

"""Supervised fine-tuning: next-token cross-entropy on the supervised (assistant) tokens only.

SFT's objective is the causal-LM loss of objectives/clm.py under the chat template's loss mask
(`m_t = 1` on assistant text and its closing token, 0 on headers, system and user text), as in
the instruction tuning of InstructGPT (Ouyang et al., 2022, "Training language models to
follow instructions with human feedback", sec. 3.5). Only the normalisation is SFT's own:

  token    loss = sum_t m_t nll_t / sum_t m_t
           every supervised token weighs the same (the default; `clm_loss` as is).
  example  loss = 1/E sum_e ( sum_{t in e} m_t nll_t / sum_{t in e} m_t )
           every example (packed segment) weighs the same whatever its length, E = number of
           segments with a supervised token: short replies are not outweighed by long ones.

Both are returned as `(sum, weight)`: for 'example' each token's weight is
`m_t / sum_{s in seg(t)} m_s`, so a segment's weights add up to 1 and the summed weight counts
examples. That stays exact under gradient accumulation and across hosts because a segment
never spans two rows. (nll_t includes the optional z-loss term of objectives/clm.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.clm import clm_loss
from objectives.reductions import Metrics, weighted_sum

NORMALIZATIONS = ("token", "example")


def example_weights(loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Per-token weights giving each segment of a packed row a total weight of 1.

  Args:
    loss_mask: `[batch, length]` float, 1 on supervised targets (any non-negative weights).
    segment_ids: `[batch, length]` int, 1, 2, ... per segment within a row, 0 on padding.
  Returns:
    `[batch, length]` float32 `m_t / sum_{s in seg(t)} m_s`; 0 where the mask is 0, so a
    segment with no supervised token has total weight 0.
  """
  mask = loss_mask.astype(jnp.float32)
  batch, length = mask.shape
  # One id per (row, segment): segment ids are < length + 1 within a row.
  ids = segment_ids.astype(jnp.int32) + (length + 1) * jnp.arange(batch, dtype=jnp.int32)[:, None]
  totals = jax.ops.segment_sum(mask.reshape(-1), ids.reshape(-1),
                               num_segments=batch * (length + 1))
  per_token_total = totals[ids]
  return jnp.where(mask > 0, mask / jnp.where(mask > 0, per_token_total, 1.0), 0.0)


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
             segment_ids: jax.Array, *, normalize: str = "token",
             z_loss: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Masked next-token cross-entropy with token- or example-level normalisation.

  Args:
    logits: `[batch, length, vocab]`; position t predicts targets[t].
    targets: `[batch, length]` int.
    loss_mask: `[batch, length]`, 1 on supervised targets (the chat template's mask).
    segment_ids: `[batch, length]` int, the packed example of each token (0: padding).
    normalize: 'token' or 'example' (see the module docstring).
    z_loss: coefficient of the (log Z)^2 penalty (objectives/clm.py).
  Returns:
    per_token: `[batch, length]` float32 nll (+ z-term), 0 where masked.
    metrics: `(sum, weight)` pairs: `loss` (optimised, weighted per `normalize`: with
      'example' its weight is the number of examples) and, from `clm_loss`, the
      token-weighted `nll`, `accuracy` and `z_loss`.
  """
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  per_token, metrics = clm_loss(logits, targets, loss_mask, z_loss=z_loss)
  if normalize == "example":
    metrics["loss"] = weighted_sum(per_token, example_weights(loss_mask, segment_ids))
  return per_token, metrics

"""Masked language modelling: cross-entropy on the masked positions only.

    nll_t = log Z_t - logit_t[target_t],        log Z_t = logsumexp_v logit_t[v]
    loss  = sum_t m_t * nll_t / sum_t m_t,      m_t = 1 where token t was selected for masking

BERT (Devlin et al., 2019, sec. 3.1): 15% of the tokens are selected; of those 80% are replaced
by [MASK], 10% by a random token and 10% kept (data/mlm_masking.py does that). The model
predicts the original token at every selected position, and only there: the 10% kept tokens
count too, which is what forces the model to keep a representation of every input token.

`masked_accuracy` is the share of selected positions whose argmax is the original token; a
model that guesses uniformly scores 1 / vocab. Everything is float32 whatever the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.clm import token_nll, top1_correct
from objectives.reductions import Metrics, weighted_sum


def mlm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
             token_mask: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """Masked-LM cross-entropy at the selected positions.

  Args:
    logits: `[batch, length, vocab]`; position t predicts the original token at t.
    targets: `[batch, length]` int, the original (unmasked) tokens.
    loss_mask: `[batch, length]`, 1 at the positions selected for prediction, else 0.
    token_mask: optional `[batch, length]`, 1 on real (non-padding) tokens; adds the metric
      `mask_rate` (selected / real tokens), which should be near the masking rate.
  Returns:
    per_token: `[batch, length]` float32 nll, 0 where not selected.
    metrics: `(sum, weight)` pairs weighted by `loss_mask`: `loss` (what is optimised),
      `masked_accuracy` (argmax == target), and `mask_rate` if `token_mask` is given.
  """
  nll, _ = token_nll(logits, targets)
  mask = loss_mask.astype(jnp.float32)
  per_token = jnp.where(mask > 0, nll, 0.0)
  correct = top1_correct(logits, targets)
  metrics = {
      "loss": weighted_sum(nll, mask),
      "masked_accuracy": weighted_sum(correct, mask),
  }
  if token_mask is not None:
    metrics["mask_rate"] = weighted_sum(mask, token_mask)
  return per_token, metrics

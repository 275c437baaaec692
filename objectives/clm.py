"""Causal language modelling: next-token cross-entropy over a loss mask.

    nll_t    = log Z_t - logit_t[target_t],      log Z_t = logsumexp_v logit_t[v]
    loss     = sum_t mask_t * (nll_t + z_loss * (log Z_t)^2) / sum_t mask_t

The z-loss term keeps the softmax normaliser near 1 for stability at scale (PaLM, Chowdhery et
al., 2022, sec. 5). Everything is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.reductions import Metrics, weighted_sum


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood and log-normaliser.

  Args:
    logits: `[..., vocab]` any float dtype.
    targets: `[...]` int token ids.
  Returns:
    (nll `[...]`, log_z `[...]`), both float32.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return log_z - target_logit, log_z


def top1_correct(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`argmax(logits, -1) == targets` as float32 `[...]`, ties going to the lowest index as in
  `jnp.argmax`, for finite logits.

  Computed without the argmax: the target is the first maximum when its logit equals the row's
  max and every logit before it is smaller. Two float max-reductions instead of argmax's
  (value, index) pair reduction, which XLA:CPU runs several times slower on logits as big as
  the `bench` shape's `[4096, 8192]` (README.md, Benchmarks).
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.int32)
  row_max = jnp.max(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  max_before = jnp.max(jnp.where(index < targets[..., None], logits, -jnp.inf), axis=-1)
  return ((target_logit == row_max) & (max_before < row_max)).astype(jnp.float32)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per token, float32 `[...]`."""
  return -token_nll(logits, targets)[0]


def clm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
             z_loss: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Next-token cross-entropy.

  Args:
    logits: `[batch, length, vocab]`; position t predicts targets[t].
    targets: `[batch, length]` int.
    loss_mask: `[batch, length]`, 1 where the target counts (0: padding, prompt, ...).
    z_loss: coefficient of the (log Z)^2 penalty.
  Returns:
    per_token: `[batch, length]` float32 loss (nll + z-term), 0 where masked.
    metrics: `(sum, weight)` pairs: `loss` (what is optimised), `nll`, `accuracy`
      (argmax == target), `z_loss`; all weighted by the mask.
  """
  nll, log_z = token_nll(logits, targets)
  z_term = z_loss * jnp.square(log_z)
  mask = loss_mask.astype(jnp.float32)
  per_token = jnp.where(mask > 0, nll + z_term, 0.0)
  correct = top1_correct(logits, targets)
  metrics = {
      "loss": weighted_sum(nll + z_term, mask),
      "nll": weighted_sum(nll, mask),
      "accuracy": weighted_sum(correct, mask),
      "z_loss": weighted_sum(z_term, mask),
  }
  return per_token, metrics

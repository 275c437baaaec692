"""Knowledge distillation: match a frozen teacher's next-token distribution, token by token.

With teacher logits `t`, student logits `s` and temperature T, per token:

    p = softmax(t / T)                      (teacher)
    q = softmax(s / T)                      (student)
    forward KL    D = KL(p || q) = sum_v p_v (log p_v - log q_v)       (Hinton et al., 2015)
    reverse KL    D = KL(q || p) = sum_v q_v (log q_v - log p_v)       (Gu et al., 2024, MiniLLM)
    JSD(beta)     D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                                                                      (Agarwal et al., 2024, GKD)
    loss_t = (1 - ce_weight) * T^2 * D  +  ce_weight * nll_t(labels)

Forward KL is mode-covering (the student spreads mass over everything the teacher allows);
reverse KL is mode-seeking (the student may drop teacher modes it cannot fit). JSD(beta)
interpolates: JSD(beta) / beta -> KL(p || q) as beta -> 0 and JSD(beta) / (1 - beta) ->
KL(q || p) as beta -> 1, and JSD(0.5) is the ordinary Jensen-Shannon divergence, at most log 2.
Soft-target gradients shrink as 1 / T^2, hence the T^2 factor (Hinton et al., 2015, sec. 2),
which keeps the mix with the label cross-entropy (at T = 1) balanced whatever T is.

The loss is summed over the loss mask (and divided once by its total by the train step). The
teacher logits are targets: the caller freezes them (training/stages/distill.py binds the
teacher from stop-gradient params). Everything is float32 whatever the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.clm import token_nll, top1_correct
from objectives.reductions import Metrics, weighted_sum

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _check(divergence: str, beta: float, temperature: float) -> None:
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence: unknown {divergence!r} ({' | '.join(DIVERGENCES)})")
  if divergence == "jsd" and not 0.0 < beta < 1.0:
    raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (the limits are the forward and "
                     "reverse KL: use those)")
  if not temperature > 0.0:
    raise ValueError(f"temperature must be > 0, got {temperature}")


def token_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *,
                     divergence: str = "forward_kl", beta: float = 0.5,
                     temperature: float = 1.0) -> jax.Array:
  """The divergence between teacher and student distributions at each position.

  Args:
    student_logits: `[..., vocab]`.
    teacher_logits: `[..., vocab]`, the same vocabulary.
    divergence: 'forward_kl' KL(p || q), 'reverse_kl' KL(q || p) or 'jsd' (generalised
      Jensen-Shannon with weight `beta` on the teacher).
    beta: JSD(beta) mixing weight, in (0, 1).
    temperature: both logits are divided by it before the softmax.
  Returns:
    `[...]` float32, >= 0 (not scaled by T^2).
  """
  _check(divergence, beta, temperature)
  if student_logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(f"student vocab {student_logits.shape[-1]} != teacher vocab "
                     f"{teacher_logits.shape[-1]}: distillation needs the same tokenizer")
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  if divergence == "forward_kl":
    return _kl(log_p, log_q)
  if divergence == "reverse_kl":
    return _kl(log_q, log_p)
  log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
  return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                 loss_mask: jax.Array, *, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, ce_weight: float = 0.0
                 ) -> tuple[jax.Array, Metrics]:
  """Distillation loss on the loss mask, optionally mixed with cross-entropy on the labels.

  Args:
    student_logits: `[batch, length, vocab]`; position t predicts targets[t].
    teacher_logits: `[batch, length, vocab]` for the same inputs.
    targets: `[batch, length]` int labels (used by the cross-entropy term and the metrics).
    loss_mask: `[batch, length]`, 1 where the token counts.
    divergence, beta, temperature: see `token_divergence`.
    ce_weight: weight in [0, 1] of the label cross-entropy; the divergence gets 1 - ce_weight.
  Returns:
    per_token: `[batch, length]` float32 loss, 0 where masked.
    metrics: `(sum, weight)` pairs weighted by the mask: `loss` (what is optimised),
      `divergence` (D at T, unscaled), `nll` (student cross-entropy on the labels at T = 1, the
      number to compare with a CLM run), `accuracy` (student argmax == label), `teacher_nll`,
      `agreement` (student argmax == teacher argmax).
  """
  if not 0.0 <= ce_weight <= 1.0:
    raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
  div = token_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta,
                         temperature=temperature)
  nll, _ = token_nll(student_logits, targets)
  teacher_nll, _ = token_nll(teacher_logits, targets)
  per_token_loss = (1.0 - ce_weight) * temperature ** 2 * div + ce_weight * nll
  mask = loss_mask.astype(jnp.float32)
  student_top = jnp.argmax(student_logits, axis=-1)
  metrics = {
      "loss": weighted_sum(per_token_loss, mask),
      "divergence": weighted_sum(div, mask),
      "nll": weighted_sum(nll, mask),
      "accuracy": weighted_sum(top1_correct(student_logits, targets), mask),
      "teacher_nll": weighted_sum(teacher_nll, mask),
      "agreement": weighted_sum(
          (student_top == jnp.argmax(teacher_logits, axis=-1)).astype(jnp.float32), mask),
  }
  return jnp.where(mask > 0, per_token_loss, 0.0), metrics

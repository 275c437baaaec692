"""GRPO and RLOO: policy gradients with group baselines instead of a value model.

Each prompt is answered G times; r_i is the score of answer i of its group. The advantage of
every token of answer i is its sequence advantage:

  GRPO     A_i = (r_i - mean_j r_j) / (std_j r_j + eps)      (population std; without the std
           when `normalize_std=False`, as Dr. GRPO argues: Liu et al., 2025)
           (Shao et al., 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
           Open Language Models", sec. 4.1.2)
  RLOO     A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) (r_i - mean_j r_j)
           the REINFORCE leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024,
           "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
           Feedback in LLMs", eq. 7)

The loss per token is PPO's clipped surrogate (objectives/ppo.py `policy_loss`) plus, with
kl_coef beta > 0, GRPO's k3 estimate of KL(pi || pi_ref) (Shao et al., eq. 4):

  l_{i,t} = max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps)) + beta k3_{i,t}

aggregated over tokens at one of two levels:

  sequence   1/N sum_i 1/|o_i| sum_t l_{i,t}    every answer weighs the same (GRPO's paper)
  token      sum_{i,t} l_{i,t} / sum_i |o_i|    every token weighs the same (DAPO, Yu et al.,
             2025: long answers are not down-weighted)

Both are `(sum, weight)` pairs: at sequence level each token weighs 1/|o_i| and the summed
weight counts answers, so accumulation over micro-batches and hosts stays exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.ppo import kl_estimate, policy_loss
from objectives.reductions import Metrics, weighted_sum

LEVELS = ("token", "sequence")


def group_advantages(rewards: jax.Array, *, normalize_std: bool = True, eps: float = 1e-4
                     ) -> jax.Array:
  """GRPO's group-normalised advantages.

  Args:
    rewards: `[..., G]` scores of the G answers of each group.
    normalize_std: divide by the group's (population) std + eps.
    eps: keeps a group of equal rewards at advantage 0.
  Returns:
    `[..., G]` float32.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  if not normalize_std:
    return centred
  return centred / (jnp.std(rewards, axis=-1, keepdims=True) + eps)


def leave_one_out_advantages(rewards: jax.Array) -> jax.Array:
  """RLOO: each answer's score minus the mean score of the other G - 1 answers.

  Args:
    rewards: `[..., G]`, G >= 2.
  Returns:
    `[..., G]` float32.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  g = rewards.shape[-1]
  if g < 2:
    raise ValueError(f"leave-one-out baselines need G >= 2 answers per prompt, got {g}")
  others = (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (g - 1)
  return rewards - others


def token_weights(mask: jax.Array, level: str) -> jax.Array:
  """Per-token weights of the loss: `mask` (token level) or `mask / |o_i|` (sequence level,
  each answer's weights add up to 1; an empty answer weighs 0).

  Args:
    mask: `[batch, T]` response mask.
    level: 'token' | 'sequence'.
  """
  mask = jnp.asarray(mask, jnp.float32)
  if level == "token":
    return mask
  if level == "sequence":
    lengths = jnp.sum(mask, axis=-1, keepdims=True)
    return mask / jnp.maximum(lengths, 1.0)
  raise ValueError(f"unknown loss aggregation level {level!r}; choose one of {LEVELS}")


def grpo_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array,
              mask: jax.Array, *, clip_eps: float, ref_log_probs: jax.Array | None = None,
              kl_coef: float = 0.0, level: str = "sequence") -> tuple[jax.Array, Metrics]:
  """The GRPO / RLOO loss (module docstring).

  Args:
    log_probs: `[batch, T]` log pi of the answer tokens under the current policy.
    old_log_probs: `[batch, T]` log pi_old (the sampling policy).
    advantages: `[batch]` sequence advantages (`group_advantages`, `leave_one_out_...`),
      or `[batch, T]` per token.
    mask: `[batch, T]` response mask.
    clip_eps: ratio clip.
    ref_log_probs: `[batch, T]` log pi_ref (needed when kl_coef > 0; reported when given).
    kl_coef: beta, the weight of the k3 KL penalty in the loss.
    level: 'sequence' | 'token' aggregation.
  Returns:
    per_token: `[batch, T]` float32 loss, 0 where masked.
    metrics: `(sum, weight)` pairs: `loss` (weighted per `level`), and token means
      `policy_loss`, `clip_fraction`, `ratio`, `approx_kl` (KL(pi_old || pi), k3), `ref_kl`
      (k3 of KL(pi || pi_ref) per token, when `ref_log_probs` is given).
  """
  mask = jnp.asarray(mask, jnp.float32)
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == 1:
    advantages = jnp.broadcast_to(advantages[:, None], mask.shape)
  if kl_coef > 0 and ref_log_probs is None:
    raise ValueError("kl_coef > 0 needs ref_log_probs")
  pg, ratio, clipped = policy_loss(log_probs, old_log_probs, advantages, clip_eps=clip_eps)
  loss = pg
  log_ratio = jnp.asarray(log_probs, jnp.float32) - jnp.asarray(old_log_probs, jnp.float32)
  metrics = {
      "policy_loss": weighted_sum(pg, mask),
      "clip_fraction": weighted_sum(clipped, mask),
      "ratio": weighted_sum(ratio, mask),
      "approx_kl": weighted_sum(jnp.expm1(log_ratio) - log_ratio, mask),
  }
  if ref_log_probs is not None:
    kl = kl_estimate(log_probs, ref_log_probs, "k3")
    metrics["ref_kl"] = weighted_sum(kl, mask)
    if kl_coef > 0:
      loss = loss + kl_coef * kl
  metrics["loss"] = weighted_sum(loss, token_weights(mask, level))
  return jnp.where(mask > 0, loss, 0.0), metrics

"""GRPO and its successors: policy gradients with group baselines instead of a value model.

Each prompt is answered G times; r_i is the score of answer i of its group, and every token of
answer i carries its sequence advantage A_i.

Advantages (`group_advantages`, `leave_one_out_advantages`)

  GRPO      A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
            (Shao et al., 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
            Open Language Models", sec. 4.1.2). The paper does not say which std: `std_ddof=0`
            (the default) is the population std, `std_ddof=1` the sample std with Bessel's
            correction, sqrt(sum_j (r_j - mean)^2 / (G - 1)), which is what `torch.std`
            computes and so what most PyTorch GRPO code uses.
  Dr. GRPO  A_i = r_i - mean_j r_j  (`normalize_std=False`): dividing by the std weighs up the
            groups that are nearly all right or all wrong (Liu et al., 2025, "Understanding
            R1-Zero-Like Training: A Critical Perspective", sec. 3.1).
  RLOO      A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) (r_i - mean_j r_j)
            the REINFORCE leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024,
            "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
            Feedback in LLMs", eq. 7).

Policy terms, per token t of answer o_i, with rho_{i,t} = pi(o_{i,t}) / pi_old(o_{i,t}) and
sg the stop-gradient:

  clip      l_{i,t} = max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps_low, 1 + eps_high))
            PPO's surrogate (objectives/ppo.py `policy_loss`). With eps_high > eps_low it is
            DAPO's "clip-higher": the decoupled upper bound lets unlikely tokens gain
            probability, against entropy collapse (Yu et al., 2025, "DAPO: An Open-Source LLM
            Reinforcement Learning System at Scale", sec. 3.1; eps_low 0.2, eps_high 0.28).
  sequence  s_i = exp(1/|o_i| sum_t log rho_{i,t})   (the length-normalised sequence ratio)
            l_{i,t} = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)) for every t
            GSPO: one importance ratio and one clip per answer, as its reward is per answer
            (Zheng et al., 2025, "Group Sequence Policy Optimization", sec. 4.1; the paper's
            eps_low 3e-4, eps_high 4e-4).
  cispo     l_{i,t} = -sg(min(rho_{i,t}, 1 + eps_high)) A_i log pi(o_{i,t})
            CISPO: REINFORCE on every token, weighted by a clipped, stop-gradient importance
            weight, so no token loses its gradient to clipping (MiniMax, 2025, "MiniMax-M1:
            Scaling Test-Time Compute Efficiently with Lightning Attention", sec. 3.1). The
            paper writes the weight clip(rho, 1 - eps_low^IS, 1 + eps_high^IS) and then sets
            eps_low^IS "to a large value", imposing no lower bound and tuning only eps_high^IS:
            here the weight has only the upper bound, and eps_low is not used.

At rho = 1 (on-policy) all three have the same gradient per token, -A_i grad log pi (GSPO's
spread as 1/|o_i| over the answer): they differ only once the policy has moved from pi_old.
With kl_coef beta > 0 each token adds beta k3_{i,t}, GRPO's estimate of KL(pi || pi_ref)
(Shao et al., eq. 4; objectives/ppo.py `kl_estimate`).

Aggregation of the per-token losses of a batch of N answers (`aggregate`):

  sequence  1/N sum_i 1/|o_i| sum_t l_{i,t}   every answer weighs the same (GRPO's eq. 3)
  token     sum_{i,t} l_{i,t} / sum_i |o_i|   every token weighs the same (DAPO, sec. 3.3)
  constant  sum_{i,t} l_{i,t} / (N L)          L = the generation budget, the arrays' width T
                                               (Dr. GRPO, sec. 3.1: no length bias either way)

Loss types, `LOSS_TYPES` (policy term, aggregation; `level=` overrides the aggregation):

  grpo      clip, sequence
  bnpo      clip, token
  dr_grpo   clip, constant   (with the caller's `normalize_std=False` advantages)
  dapo      clip, token      (bnpo's loss: DAPO is its settings, eps_high 0.28 and no KL, and
                             two changes to the rollout, dynamic sampling and overlong reward
                             shaping: training/rl/loop.py, training/rl/rewards.py)
  gspo      sequence, sequence
  cispo     cispo, token     (the paper normalises by the batch's token count)

Exact under any split. Every aggregation is a pair (sum_{i,t} w_{i,t} l_{i,t}, W) with
w = 1/|o_i|, 1 or 1/L and W = N, sum_i |o_i| or N: both add up over answers. Summing the pairs
of micro-batches, devices and hosts and dividing once therefore gives the whole batch's loss
exactly, provided no split cuts an answer (rows are never split) and every part has the same
width L (the constant level divides by the budget, never by a part's longest answer); GSPO's
s_i needs the whole answer too, which a row has. So bnpo and dapo are one aggregation here:
the normaliser is always the whole update's token count, however it is split. Each of
`rl.minibatches` minibatches is its own optimizer step with its own normaliser.

Packed rows (`segment_ids`; training/rl/packing.py): a row may hold several answers, each its
own segment. Everything per answer (|o_i|, GSPO's s_i, the count N) is then a sum over the
answer's segment (objectives/pairs.py `segment_sums`), and the constant level's L is the
generation `budget` (no longer the arrays' width): the loss and its gradient are those of the
same answers one per row.

Stale rollouts (`importance_weights`; training/rl/offpolicy.py): when the answers were sampled
by an older policy mu, not by pi_old, every policy term is multiplied by the truncated,
stop-gradient importance weight

  w_{i,t} = sg(min(pi_old(o_{i,t}) / mu(o_{i,t}), C))                     (objectives/ppo.py)

(truncated importance sampling, TIS: Ionides, 2008; for LLM RL with a stale or mismatched
sampler, Yao et al., 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training"; the decoupled proximal policy pi_old of Hilton et al., 2022, "Batch size-invariance
for policy optimization"). The clip still bounds pi / pi_old; w corrects pi_old / mu. The KL
penalty is not weighted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from objectives.pairs import segment_sums
from objectives.ppo import kl_estimate, policy_loss
from objectives.reductions import Metric, Metrics, weighted_sum

LEVELS = ("sequence", "token", "constant")
POLICY_TERMS = ("clip", "sequence", "cispo")


class LossType(NamedTuple):
  policy: str  # one of POLICY_TERMS
  level: str   # one of LEVELS


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType("clip", "sequence"),
    "bnpo": LossType("clip", "token"),
    "dr_grpo": LossType("clip", "constant"),
    "dapo": LossType("clip", "token"),
    "gspo": LossType("sequence", "sequence"),
    "cispo": LossType("cispo", "token"),
}


def group_advantages(rewards: jax.Array, *, normalize_std: bool = True, std_ddof: int = 0,
                     eps: float = 1e-4) -> jax.Array:
  """GRPO's group-normalised advantages (Dr. GRPO's without the std).

  Args:
    rewards: `[..., G]` scores of the G answers of each group.
    normalize_std: divide by the group's std + eps.
    std_ddof: 0, the population std; 1, the sample (Bessel-corrected) std.
    eps: keeps a group of equal rewards at advantage 0.
  Returns:
    `[..., G]` float32.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  if not normalize_std:
    return centred
  if std_ddof not in (0, 1) or rewards.shape[-1] <= std_ddof:
    raise ValueError(f"std_ddof must be 0 or 1 and below G = {rewards.shape[-1]}, got "
                     f"{std_ddof}")
  return centred / (jnp.std(rewards, axis=-1, keepdims=True, ddof=std_ddof) + eps)


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


def answer_sums(values: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Per token, the sum of `values` over the token's answer, `[batch, L]` float32.

  Args:
    values: `[batch, L]`.
    segment_ids: `[batch, L]` the answer (segment) of each token, 0 on padding (packed rows);
      None: each row is one answer.
  """
  values = jnp.asarray(values, jnp.float32)
  if segment_ids is None:
    return jnp.broadcast_to(jnp.sum(values, axis=-1, keepdims=True), values.shape)
  segment_ids = jnp.asarray(segment_ids)
  sums = segment_sums(values, segment_ids)
  index = jnp.maximum(segment_ids - 1, 0).astype(jnp.int32)
  return jnp.where(segment_ids > 0, jnp.take_along_axis(sums, index, axis=-1), 0.0)


def token_weights(mask: jax.Array, level: str, segment_ids: jax.Array | None = None,
                  budget: float | jax.Array | None = None) -> jax.Array:
  """Per-token weights w of the loss sum (module docstring): `mask` (token), `mask / |o_i|`
  (sequence: each answer's weights add up to 1, an empty one's to 0) or `mask / L` (constant).

  Args:
    mask: `[batch, L]` response mask.
    level: one of LEVELS.
    segment_ids: `[batch, L]` answers of packed rows (`answer_sums`); None: one per row.
    budget: L of the constant level, a number or an array broadcasting against `mask`;
      None: the width of `mask`.
  """
  mask = jnp.asarray(mask, jnp.float32)
  if level == "token":
    return mask
  if level == "sequence":
    return mask / jnp.maximum(answer_sums(mask, segment_ids), 1.0)
  if level == "constant":
    return mask / (mask.shape[-1] if budget is None else budget)
  raise ValueError(f"unknown loss aggregation level {level!r}; choose one of {LEVELS}")


def count_answers(mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """N: the answers (rows, or segments of packed rows) of `mask [batch, L]` with at least one
  response token."""
  mask = jnp.asarray(mask, jnp.float32)
  if segment_ids is None:
    return jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32))
  return jnp.sum((segment_sums(mask, jnp.asarray(segment_ids)) > 0).astype(jnp.float32))


def aggregate(values: jax.Array, mask: jax.Array, level: str,
              segment_ids: jax.Array | None = None,
              budget: float | jax.Array | None = None) -> Metric:
  """`(sum_{i,t} w_{i,t} values_{i,t}, W)` of `level` (module docstring): sum / W is the loss.

  Args:
    values: `[batch, L]` per-token losses (ignored where `mask` is 0, even if nan).
    mask: `[batch, L]` response mask.
    level: one of LEVELS.
    segment_ids, budget: packed rows' answers and the constant level's L (`token_weights`).
  """
  total, weight = weighted_sum(values, token_weights(mask, level, segment_ids, budget))
  if level == "constant":
    weight = count_answers(mask, segment_ids)
  return total, weight


def policy_term(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array,
                mask: jax.Array, *, policy: str, clip_eps_low: float, clip_eps_high: float,
                segment_ids: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The policy loss per token of one of POLICY_TERMS (module docstring).

  Args:
    log_probs, old_log_probs: `[batch, L]` log pi and log pi_old of the answer tokens.
    advantages: `[batch, L]`.
    mask: `[batch, L]`; masked entries are read as 0, so nan there changes nothing.
    policy: 'clip' | 'sequence' | 'cispo'.
    clip_eps_low, clip_eps_high: the bounds 1 - eps_low, 1 + eps_high (cispo: the upper only).
    segment_ids: `[batch, L]` answers of packed rows (`answer_sums`); None: one per row.
  Returns:
    (loss, ratio (rho, or s_i on every token of answer i), clipped: 1.0 where the clip
    binds: the gradient through the ratio is cut, or for cispo the weight is capped), each
    `[batch, L]` float32.
  """
  live = jnp.asarray(mask) > 0
  log_probs = jnp.where(live, jnp.asarray(log_probs, jnp.float32), 0.0)
  log_ratio = log_probs - jnp.where(live, jnp.asarray(old_log_probs, jnp.float32), 0.0)
  zeros = jnp.zeros_like(log_ratio)
  if policy == "clip":
    return policy_loss(log_ratio, zeros, advantages, clip_eps=clip_eps_low,
                       clip_eps_high=clip_eps_high)
  if policy == "sequence":
    if segment_ids is None:
      lengths = jnp.maximum(jnp.sum(live, axis=-1, keepdims=True), 1).astype(jnp.float32)
      sequence = jnp.broadcast_to(jnp.sum(log_ratio, axis=-1, keepdims=True) / lengths,
                                  log_ratio.shape)
    else:
      lengths = jnp.maximum(answer_sums(live.astype(jnp.float32), segment_ids), 1.0)
      sequence = answer_sums(log_ratio, segment_ids) / lengths
    return policy_loss(sequence, zeros, advantages,
                       clip_eps=clip_eps_low, clip_eps_high=clip_eps_high)
  if policy == "cispo":
    ratio = jnp.exp(log_ratio)
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + clip_eps_high))
    return (-weight * advantages * log_probs, ratio,
            (ratio > 1.0 + clip_eps_high).astype(jnp.float32))
  raise ValueError(f"unknown policy term {policy!r}; choose one of {POLICY_TERMS}")


def grpo_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array,
              mask: jax.Array, *, clip_eps_low: float, clip_eps_high: float | None = None,
              ref_log_probs: jax.Array | None = None, kl_coef: float = 0.0,
              loss_type: str = "grpo", level: str | None = None,
              segment_ids: jax.Array | None = None, budget: float | jax.Array | None = None,
              importance_weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """A loss of the GRPO family (module docstring).

  Args:
    log_probs: `[batch, L]` log pi of the answer tokens under the current policy.
    old_log_probs: `[batch, L]` log pi_old (the sampling policy); on-policy,
      `jax.lax.stop_gradient(log_probs)` gives exactly the loss and gradient of a separate
      forward pass.
    advantages: `[batch]` sequence advantages (`group_advantages`, `leave_one_out_...`),
      or `[batch, L]` per token.
    mask: `[batch, L]` response mask; L is the generation budget of the constant level.
    clip_eps_low: the lower ratio clip, 1 - eps_low (cispo: unused).
    clip_eps_high: the upper clip, 1 + eps_high; None: `clip_eps_low`.
    ref_log_probs: `[batch, L]` log pi_ref (needed when kl_coef > 0; reported when given).
    kl_coef: beta, the weight of the k3 KL penalty in the loss.
    loss_type: one of LOSS_TYPES.
    level: the aggregation, one of LEVELS; None: the loss type's.
    segment_ids: `[batch, L]` the answer of each token in packed rows (1, 2, ... per row, 0
      on padding); None: every row is one answer.
    budget: the constant level's L, a number or `[batch, 1]`; None: the width L of `mask`.
    importance_weights: `[batch, L]` truncated weights pi_old / mu of a stale rollout
      (objectives/ppo.py `truncated_weights`; under stop_gradient), multiplying the policy
      term; None: 1.
  Returns:
    per_token: `[batch, L]` float32 loss, 0 where masked.
    metrics: `(sum, weight)` pairs: `loss` (aggregated per the level), the token means
      `policy_loss`, `clip_fraction`, `ratio`, `approx_kl` (KL(pi_old || pi), k3) and, with
      `ref_log_probs`, `ref_kl` (k3 of KL(pi || pi_ref) per token) and `reply_kl` (its k1
      estimate summed over each answer, per answer).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of "
                     f"{' | '.join(LOSS_TYPES)}")
  kind = LOSS_TYPES[loss_type]
  level = level or kind.level
  if level not in LEVELS:
    raise ValueError(f"unknown loss aggregation level {level!r}; choose one of {LEVELS}")
  if kl_coef > 0 and ref_log_probs is None:
    raise ValueError("kl_coef > 0 needs ref_log_probs")
  mask = jnp.asarray(mask, jnp.float32)
  live = mask > 0
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jnp.broadcast_to(advantages, mask.shape)
  high = clip_eps_low if clip_eps_high is None else clip_eps_high
  pg, ratio, clipped = policy_term(log_probs, old_log_probs, advantages, mask,
                                   policy=kind.policy, clip_eps_low=clip_eps_low,
                                   clip_eps_high=high, segment_ids=segment_ids)
  if importance_weights is not None:
    pg = pg * jax.lax.stop_gradient(jnp.asarray(importance_weights, jnp.float32))
  log_probs = jnp.where(live, jnp.asarray(log_probs, jnp.float32), 0.0)
  log_ratio = log_probs - jnp.where(live, jnp.asarray(old_log_probs, jnp.float32), 0.0)
  metrics = {
      "policy_loss": weighted_sum(pg, mask),
      "clip_fraction": weighted_sum(clipped, mask),
      "ratio": weighted_sum(ratio, mask),
      "approx_kl": weighted_sum(jnp.expm1(log_ratio) - log_ratio, mask),
  }
  loss = pg
  if ref_log_probs is not None:
    ref_log_probs = jnp.where(live, jnp.asarray(ref_log_probs, jnp.float32), 0.0)
    kl = kl_estimate(log_probs, ref_log_probs, "k3")
    metrics["ref_kl"] = weighted_sum(kl, mask)
    metrics["reply_kl"] = (weighted_sum(log_probs - ref_log_probs, mask)[0],
                           count_answers(mask, segment_ids))
    if kl_coef > 0:
      loss = loss + kl_coef * kl
  if importance_weights is not None:
    metrics["importance_weight"] = weighted_sum(importance_weights, mask)
  metrics["loss"] = aggregate(loss, mask, level, segment_ids, budget)
  return jnp.where(live, loss, 0.0), metrics

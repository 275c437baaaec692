"""PPO for language models, as pure functions of per-token arrays (RLHF, Ouyang et al., 2022).

A response of T tokens is an episode: the state before token t is the prompt and tokens < t,
the action is token t. All arrays are `[batch, T]` over response positions with a `mask`
(1 on generated tokens, the stop token included; 0 after the row stopped).

  KL estimators    r_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t), a_t sampled from pi
                   (Schulman, 2020, "Approximating KL Divergence"):
                     k1 = r_t                        unbiased, may be negative
                     k2 = r_t^2 / 2                  biased, low variance
                     k3 = exp(-r_t) - 1 + r_t        unbiased and >= 0
  token rewards    R_t = -kl_coef * k_t  +  score * [t is the last response token]
                   the reward-model or function score arrives at the end of the episode;
                   the KL penalty keeps pi near pi_ref (Ziegler et al., 2019, eq. 2)
  GAE              delta_t = R_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1},
                   V and A are 0 after the last token; returns G_t = A_t + V_t
                   (Schulman et al., 2016, "High-Dimensional Continuous Control Using
                   Generalized Advantage Estimation", eq. 16)
  whitening        A <- (A - mean A) / (std A + eps) over the masked tokens of the batch
  policy loss      rho_t = exp(log pi - log pi_old),
                   l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
                   (Schulman et al., 2017, "Proximal Policy Optimization Algorithms", eq. 7)
  value loss       l_t = 1/2 max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - G_t)^2)
                   (the clipped value loss of OpenAI's PPO2 baseline, used by Ziegler et al.)
  entropy          H_t = -sum_v p_v log p_v of the policy's next-token distribution
  adaptive KL      e = clip(KL / KL_target - 1, -0.2, 0.2),  kl_coef <- kl_coef (1 + e n / H)
                   after each batch of n episodes, horizon H (Ziegler et al., 2019, sec. 2.2)
  stale rollouts   w_t = sg(min(pi_old(a_t|s_t) / mu(a_t|s_t), C)) multiplies l_t when the
                   tokens were sampled by an older policy mu (training/rl/offpolicy.py):
                   truncated importance sampling (TIS; Ionides, 2008; Yao et al., 2025, "Your
                   Efficient RL Framework Secretly Brings You Off-Policy RL Training") with
                   pi_old as the decoupled proximal policy the clip is taken against (Hilton et
                   al., 2022, "Batch size-invariance for policy optimization", eq. 2). The
                   value loss is not weighted.

`ppo_loss` returns per-token losses and `(sum, weight)` metrics weighted by `token_weights`
(default: the mask, i.e. the mean over response tokens), so gradient accumulation and
multi-host means are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.reductions import Metrics, weighted_sum

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(log_probs: jax.Array, ref_log_probs: jax.Array, estimator: str = "k1"
                ) -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) at tokens sampled from pi (module docstring).

  Args:
    log_probs: `[...]` log pi of the sampled tokens.
    ref_log_probs: `[...]` log pi_ref of the same tokens.
    estimator: 'k1' | 'k2' | 'k3'.
  Returns:
    `[...]` float32.
  """
  r = jnp.asarray(log_probs, jnp.float32) - jnp.asarray(ref_log_probs, jnp.float32)
  if estimator == "k1":
    return r
  if estimator == "k2":
    return 0.5 * jnp.square(r)
  if estimator == "k3":
    # expm1 keeps precision when r is tiny (k3 ~ r^2 / 2 there).
    return jnp.expm1(-r) + r
  raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def truncated_weights(log_probs: jax.Array, behaviour_log_probs: jax.Array, mask: jax.Array,
                      cap: float) -> tuple[jax.Array, jax.Array]:
  """TIS weights of a stale rollout (module docstring): min(exp(log pi_old - log mu), C).

  Args:
    log_probs: `[...]` log pi_old of the sampled tokens (the policy the clip is taken
      against; on-policy-reuse: the current policy's, taken under stop_gradient).
    behaviour_log_probs: `[...]` log mu, the log-probs of the policy that sampled them.
    mask: `[...]`; weights are 0 where it is 0.
    cap: C >= 1, the truncation.
  Returns:
    (weights `[...]` float32 under stop_gradient, truncated `[...]` float 1.0 where the cap
    binds).
  """
  mask = jnp.asarray(mask, jnp.float32)
  log_ratio = jnp.where(mask > 0, jnp.asarray(log_probs, jnp.float32)
                        - jnp.asarray(behaviour_log_probs, jnp.float32), 0.0)
  ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
  return jnp.minimum(ratio, cap) * mask, (ratio > cap).astype(jnp.float32) * mask


def last_token_mask(mask: jax.Array) -> jax.Array:
  """`[batch, T]` 1.0 at each row's last masked token (mask contiguous from position 0)."""
  mask = jnp.asarray(mask, jnp.float32)
  following = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  return mask * (1.0 - following)


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float | jax.Array
                  ) -> jax.Array:
  """R_t = -kl_coef kl_t + score at the last response token; 0 where masked.

  Args:
    scores: `[batch]` sequence scores (reward model or function, penalties included).
    kl: `[batch, T]` per-token KL estimates (`kl_estimate`).
    mask: `[batch, T]` response mask.
    kl_coef: the KL penalty coefficient.
  Returns:
    `[batch, T]` float32.
  """
  mask = jnp.asarray(mask, jnp.float32)
  rewards = -kl_coef * jnp.where(mask > 0, kl, 0.0)
  return rewards + jnp.asarray(scores, jnp.float32)[:, None] * last_token_mask(mask)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation along the response (module docstring).

  Args:
    rewards: `[batch, T]` per-token rewards R_t.
    values: `[batch, T]` V_t, the value of the state before token t.
    mask: `[batch, T]`, 1 on response tokens; V_{t+1} and A_{t+1} count as 0 where
      `mask[t + 1]` is 0 (the episode ended).
    gamma: discount.
    lam: GAE lambda (1: Monte-Carlo returns minus V; 0: one-step TD).
  Returns:
    (advantages, returns) `[batch, T]` float32, 0 where masked.
  """
  mask = jnp.asarray(mask, jnp.float32)
  rewards = jnp.where(mask > 0, jnp.asarray(rewards, jnp.float32), 0.0)
  values = jnp.where(mask > 0, jnp.asarray(values, jnp.float32), 0.0)
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
  next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  deltas = rewards + gamma * next_values * next_mask - values

  def step(next_advantage, xs):
    delta, live_next = xs
    advantage = delta + gamma * lam * live_next * next_advantage
    return advantage, advantage

  # Scan over time backwards, time-major.
  _, advantages = jax.lax.scan(step, jnp.zeros(rewards.shape[:1], jnp.float32),
                               (deltas.T, next_mask.T), reverse=True)
  advantages = advantages.T * mask
  return advantages, (advantages + values) * mask


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  s, w = weighted_sum(values, mask)
  return s / jnp.maximum(w, 1e-8)


def masked_var(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Population variance over the masked entries."""
  mean = masked_mean(values, mask)
  return masked_mean(jnp.square(jnp.asarray(values, jnp.float32) - mean), mask)


def whiten(values: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
           ) -> jax.Array:
  """(x - mean) / (std + eps) over the masked entries (mean kept if not `shift_mean`); 0 where
  masked. The std is the population std of the masked entries."""
  mean = masked_mean(values, mask)
  scaled = (jnp.asarray(values, jnp.float32) - mean) / (jnp.sqrt(masked_var(values, mask)) + eps)
  if not shift_mean:
    scaled = scaled + mean
  return jnp.where(jnp.asarray(mask) > 0, scaled, 0.0)


def policy_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, *,
                clip_eps: float, clip_eps_high: float | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PPO's clipped surrogate, per token, as a loss (to minimise).

  Args:
    log_probs: `[...]` log pi of the taken tokens under the current policy.
    old_log_probs: `[...]` log pi_old (the policy that sampled them).
    advantages: `[...]` A_t.
    clip_eps: eps of clip(rho, 1 - eps, 1 + eps_high).
    clip_eps_high: the upper clip, decoupled from the lower one (DAPO's "clip-higher",
      objectives/grpo.py); None: `clip_eps`.
  Returns:
    (loss `[...]`, ratio rho `[...]`, clipped `[...]` float 1.0 where the clipped term is the
    larger one, i.e. the gradient through rho is cut).
  """
  log_ratio = jnp.asarray(log_probs, jnp.float32) - jnp.asarray(old_log_probs, jnp.float32)
  ratio = jnp.exp(log_ratio)
  advantages = jnp.asarray(advantages, jnp.float32)
  unclipped = -advantages * ratio
  high = clip_eps if clip_eps_high is None else clip_eps_high
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
  return jnp.maximum(unclipped, clipped), ratio, (clipped > unclipped).astype(jnp.float32)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, *,
               clip: float | None) -> tuple[jax.Array, jax.Array]:
  """Clipped value loss per token (module docstring); `clip=None` or <= 0: unclipped.

  Returns:
    (loss `[...]`, clipped `[...]` float 1.0 where the clipped error is the larger one).
  """
  values = jnp.asarray(values, jnp.float32)
  returns = jnp.asarray(returns, jnp.float32)
  unclipped = jnp.square(values - returns)
  if clip is None or clip <= 0:
    return 0.5 * unclipped, jnp.zeros_like(unclipped)
  old_values = jnp.asarray(old_values, jnp.float32)
  clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
  clipped = jnp.square(clipped_values - returns)
  return 0.5 * jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def entropy(logits: jax.Array) -> jax.Array:
  """-sum_v p_v log p_v of each row of `logits [..., vocab]` -> `[...]` float32."""
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var[G - V] / Var[G] over the masked tokens: 1 is a perfect value function, 0 no
  better than a constant, < 0 worse. 0 when the returns do not vary."""
  var_returns = masked_var(returns, mask)
  var_error = masked_var(jnp.asarray(returns, jnp.float32) - jnp.asarray(values, jnp.float32),
                         mask)
  return jnp.where(var_returns > 0, 1.0 - var_error / jnp.maximum(var_returns, 1e-30), 0.0)


def adaptive_kl_coef(kl_coef: float, kl: float, *, target: float, horizon: float,
                     n_steps: int) -> float:
  """The adaptive KL controller's next coefficient (Ziegler et al., 2019, sec. 2.2).

  Args:
    kl_coef: the current coefficient.
    kl: the measured KL(pi || pi_ref) of the batch (per episode, summed over tokens).
    target: the KL aimed at.
    horizon: H; the larger, the slower the coefficient moves.
    n_steps: episodes in the batch.
  """
  error = min(max(kl / target - 1.0, -0.2), 0.2)
  return kl_coef * (1.0 + error * n_steps / horizon)


def ppo_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array,
             mask: jax.Array, *, clip_eps: float, values: jax.Array | None = None,
             old_values: jax.Array | None = None, returns: jax.Array | None = None,
             value_clip: float | None = None, vf_coef: float = 0.0,
             token_entropy: jax.Array | None = None, entropy_coef: float = 0.0,
             token_weights: jax.Array | None = None,
             importance_weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """PPO's loss per token: clipped policy loss + vf_coef * value loss - entropy_coef * H.

  Args:
    log_probs, old_log_probs, advantages, mask: `[batch, T]` (see `policy_loss`).
    clip_eps: policy ratio clip.
    values, old_values, returns: `[batch, T]` for the value loss (None: no value loss).
    value_clip: clip of the value loss (None / 0: unclipped).
    vf_coef: weight of the value loss.
    token_entropy: `[batch, T]` policy entropy (None: not reported, no bonus).
    entropy_coef: weight of the entropy bonus.
    token_weights: `[batch, T]` weights of the optimised `loss` (default: `mask`: the mean
      over tokens). Other metrics are always token means.
    importance_weights: `[batch, T]` truncated weights pi_old / mu of a stale rollout
      (`truncated_weights`; used under stop_gradient), multiplying the policy loss; None: 1.
  Returns:
    per_token: `[batch, T]` float32 loss, 0 where masked.
    metrics: `(sum, weight)` pairs: `loss`, `policy_loss`, `clip_fraction`, `approx_kl`
      (k3 estimate of KL(pi_old || pi)), `ratio`; with values `value_loss`,
      `value_clip_fraction`, `value`; with entropy `entropy`.
  """
  mask = jnp.asarray(mask, jnp.float32)
  pg, ratio, clipped = policy_loss(log_probs, old_log_probs, advantages, clip_eps=clip_eps)
  if importance_weights is not None:
    pg = pg * jax.lax.stop_gradient(jnp.asarray(importance_weights, jnp.float32))
  loss = pg
  log_ratio = jnp.asarray(log_probs, jnp.float32) - jnp.asarray(old_log_probs, jnp.float32)
  metrics = {
      "policy_loss": weighted_sum(pg, mask),
      "clip_fraction": weighted_sum(clipped, mask),
      # KL(pi_old || pi) at tokens from pi_old: k3 with the roles of the two policies swapped.
      "approx_kl": weighted_sum(jnp.expm1(log_ratio) - log_ratio, mask),
      "ratio": weighted_sum(ratio, mask),
  }
  if values is not None:
    vf, vclipped = value_loss(values, old_values, returns, clip=value_clip)
    loss = loss + vf_coef * vf
    metrics.update(value_loss=weighted_sum(vf, mask),
                   value_clip_fraction=weighted_sum(vclipped, mask),
                   value=weighted_sum(values, mask))
  if importance_weights is not None:
    metrics["importance_weight"] = weighted_sum(importance_weights, mask)
  if token_entropy is not None:
    loss = loss - entropy_coef * token_entropy
    metrics["entropy"] = weighted_sum(token_entropy, mask)
  weights = mask if token_weights is None else jnp.asarray(token_weights, jnp.float32) * mask
  metrics["loss"] = weighted_sum(loss, weights)
  return jnp.where(mask > 0, loss, 0.0), metrics

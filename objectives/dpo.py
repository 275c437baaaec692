"""The DPO family: preference losses on sequence log-probs of chosen (w) and rejected (l) answers.

Inputs are per-pair sums of completion-token log-probs (objectives/pairs.py), float32:
log pi(y|x) of the policy and, for reference-based losses, log pi_ref(y|x). With the policy's
log-ratio margin

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

the losses, per pair (sigma = logistic sigmoid, beta > 0, eps = label_smoothing):

  sigmoid  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
           DPO (Rafailov et al., 2023, "Direct Preference Optimization"); eps > 0 is
           conservative DPO for noisy labels (cDPO, Mitchell, 2023, "A note on DPO with noisy
           preferences"). eps = 0 is plain DPO.
  hinge    max(0, 1 - beta h)
           SLiC-HF's calibration loss (Zhao et al., 2023, "SLiC-HF: Sequence Likelihood
           Calibration with Human Feedback"), on the log-ratio margin.
  ipo      (h - 1 / (2 beta))^2
           IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from
           Human Preferences", eq. 17); h on summed log-probs as in the paper.
  ipo_mean (h_mean - 1 / (2 beta))^2,  h_mean = h with every log-prob divided by its answer's
           length |y| (the log-ratio averaged over tokens): the form IPO's authors confirmed
           they ran; it keeps the target margin 1 / (2 beta) independent of answer length.
  robust   [(1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps)
           robust DPO, unbiased under label flips with rate eps < 1/2 (Chowdhury et al., 2024,
           "Provably Robust DPO: Aligning Language Models with Noisy Feedback", eq. 7).
  simpo    -log sigma(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma)
           SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization with a
           Reference-Free Reward"): reference-free, length-normalised, target margin gamma.
  orpo     -a_w + lambda * -log sigma(log odds(y_w|x) - log odds(y_l|x)),
           a = log pi(y|x) / |y| (mean token log-prob), odds = e^a / (1 - e^a)
           ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without
           Reference Model", eqs. 6-7): NLL on the chosen answer plus an odds-ratio term;
           reference-free.

Implicit rewards reported as metrics: beta (log pi - log pi_ref) for the reference-based
losses (divided by |y| for ipo_mean), beta a = beta / |y| log pi(y|x) for SimPO and ORPO
(their length-normalised rewards).
`rewards/accuracies` counts a pair as right when its chosen reward is higher, and a tie as half
right: with policy == reference every reward is 0 and accuracy is exactly 0.5.

Every loss is per pair; `dpo_loss` returns them with `(sum, weight)` metrics whose weight is
the number of real pairs, so accumulation and multi-host means are exact.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from objectives.reductions import Metrics, weighted_sum


class PairLogps(NamedTuple):
  """Per-pair sequence log-probs and completion lengths, each `[...]` float32."""
  chosen: jax.Array                    # log pi(y_w|x), summed over completion tokens
  rejected: jax.Array                  # log pi(y_l|x)
  ref_chosen: jax.Array | None = None  # log pi_ref(y_w|x); None for reference-free losses
  ref_rejected: jax.Array | None = None
  chosen_tokens: jax.Array | None = None   # |y_w| (completion tokens); SimPO / ORPO
  rejected_tokens: jax.Array | None = None


class Hyper(NamedTuple):
  beta: float = 0.1
  label_smoothing: float = 0.0   # eps of cDPO / robust DPO
  simpo_gamma: float = 0.5       # SimPO target reward margin gamma
  orpo_lambda: float = 0.1       # ORPO weight of the odds-ratio term


# Each loss: (logps, hyper) -> (loss, chosen reward, rejected reward), all per pair.
LossOutput = tuple[jax.Array, jax.Array, jax.Array]


def log_ratio_rewards(logps: PairLogps, beta: float) -> tuple[jax.Array, jax.Array]:
  """beta (log pi - log pi_ref) of chosen and rejected: DPO's implicit rewards."""
  if logps.ref_chosen is None or logps.ref_rejected is None:
    raise ValueError("this loss needs reference log-probs (ref_chosen, ref_rejected)")
  return beta * (logps.chosen - logps.ref_chosen), beta * (logps.rejected - logps.ref_rejected)


def sigmoid_loss(logps: PairLogps, hp: Hyper) -> LossOutput:
  reward_w, reward_l = log_ratio_rewards(logps, hp.beta)
  z = reward_w - reward_l  # beta h
  eps = hp.label_smoothing
  loss = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  return loss, reward_w, reward_l


def hinge_loss(logps: PairLogps, hp: Hyper) -> LossOutput:
  reward_w, reward_l = log_ratio_rewards(logps, hp.beta)
  return jax.nn.relu(1.0 - (reward_w - reward_l)), reward_w, reward_l


def ipo_loss(logps: PairLogps, hp: Hyper) -> LossOutput:
  reward_w, reward_l = log_ratio_rewards(logps, hp.beta)
  h = (reward_w - reward_l) / hp.beta
  return jnp.square(h - 1.0 / (2.0 * hp.beta)), reward_w, reward_l


def robust_loss(logps: PairLogps, hp: Hyper) -> LossOutput:
  eps = hp.label_smoothing
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
  reward_w, reward_l = log_ratio_rewards(logps, hp.beta)
  z = reward_w - reward_l
  loss = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2 * eps)
  return loss, reward_w, reward_l


def _per_token(logps: PairLogps, chosen: jax.Array, rejected: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """`chosen / |y_w|`, `rejected / |y_l|`."""
  if logps.chosen_tokens is None or logps.rejected_tokens is None:
    raise ValueError("this loss needs completion lengths (chosen_tokens, rejected_tokens)")
  # max(., 1): a pair slot without tokens (padding) must not divide by zero.
  return (chosen / jnp.maximum(logps.chosen_tokens, 1.0),
          rejected / jnp.maximum(logps.rejected_tokens, 1.0))


def _mean_log_probs(logps: PairLogps) -> tuple[jax.Array, jax.Array]:
  return _per_token(logps, logps.chosen, logps.rejected)


def ipo_mean_loss(logps: PairLogps, hp: Hyper) -> LossOutput:
  reward_w, reward_l = _per_token(logps, *log_ratio_rewards(logps, hp.beta))
  h = (reward_w - reward_l) / hp.beta
  return jnp.square(h - 1.0 / (2.0 * hp.beta)), reward_w, reward_l


def simpo_loss(logps: PairLogps, hp: Hyper) -> LossOutput:
  mean_w, mean_l = _mean_log_probs(logps)
  reward_w, reward_l = hp.beta * mean_w, hp.beta * mean_l
  return -jax.nn.log_sigmoid(reward_w - reward_l - hp.simpo_gamma), reward_w, reward_l


def log_odds(mean_log_prob: jax.Array) -> jax.Array:
  """log(p / (1 - p)) for p = exp(mean_log_prob) <= 1, stable near p = 1."""
  # p = 1 exactly (every token certain) has infinite odds; cap just below it.
  a = jnp.minimum(mean_log_prob, -1e-6)
  return a - jnp.log(-jnp.expm1(a))


def orpo_loss(logps: PairLogps, hp: Hyper) -> LossOutput:
  mean_w, mean_l = _mean_log_probs(logps)
  odds_ratio = -jax.nn.log_sigmoid(log_odds(mean_w) - log_odds(mean_l))
  return -mean_w + hp.orpo_lambda * odds_ratio, hp.beta * mean_w, hp.beta * mean_l


LOSSES: dict[str, Callable[[PairLogps, Hyper], LossOutput]] = {
    "sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss, "ipo_mean": ipo_mean_loss,
    "robust": robust_loss, "simpo": simpo_loss, "orpo": orpo_loss,
}
REFERENCE_FREE = ("simpo", "orpo")


def preference_accuracy(reward_w: jax.Array, reward_l: jax.Array) -> jax.Array:
  """1 where the chosen reward is higher, 1/2 on a tie, 0 otherwise."""
  return jnp.where(reward_w > reward_l, 1.0, jnp.where(reward_w == reward_l, 0.5, 0.0))


def dpo_loss(logps: PairLogps, mask: jax.Array, *, loss_type: str = "sigmoid",
             hyper: Hyper = Hyper()) -> tuple[jax.Array, Metrics]:
  """A DPO-family loss per pair, with its metrics.

  Args:
    logps: per-pair log-probs (and lengths), each `[...]` (e.g. `[batch, pairs]`).
    mask: `[...]`, 1 for a real pair, 0 for an empty slot (its values are ignored, even nan).
    loss_type: one of `LOSSES`.
    hyper: beta, label smoothing, SimPO gamma, ORPO lambda.

  Returns:
    per_pair: `[...]` float32 loss, 0 where masked.
    metrics: `(sum, weight)` pairs weighted by the mask: `loss`, `rewards/chosen`,
      `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
      `logps/rejected` (summed policy log-probs).
  """
  if loss_type not in LOSSES:
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {sorted(LOSSES)}")
  logps = PairLogps(*(None if x is None else jnp.asarray(x, jnp.float32) for x in logps))
  loss, reward_w, reward_l = LOSSES[loss_type](logps, hyper)
  mask = jnp.asarray(mask, jnp.float32)
  per_pair = jnp.where(mask > 0, loss, 0.0)
  metrics = {
      "loss": weighted_sum(loss, mask),
      "rewards/chosen": weighted_sum(reward_w, mask),
      "rewards/rejected": weighted_sum(reward_l, mask),
      "rewards/accuracies": weighted_sum(preference_accuracy(reward_w, reward_l), mask),
      "rewards/margins": weighted_sum(reward_w - reward_l, mask),
      "logps/chosen": weighted_sum(logps.chosen, mask),
      "logps/rejected": weighted_sum(logps.rejected, mask),
  }
  return per_pair, metrics

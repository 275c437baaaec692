"""PPO (RLHF): per-token KL-penalised rewards, GAE, clipped policy and value updates.

One iteration (training/rl/loop.py): sample one reply per prompt (`rl.samples_per_prompt`,
normally 1), score it at its last token, then here

    k_t   = KL estimate of log pi_old - log pi_ref at each reply token (objective.kl_estimator)
    R_t   = -kl_coef k_t + score [t last]                     (objectives/ppo.py token_rewards)
    A, G  = GAE(R, V_old; gamma, lam), A whitened over the batch's reply tokens
    then `rl.epochs` x `rl.minibatches` steps of the clipped policy loss
    + vf_coef x clipped value loss - entropy_coef x entropy,

and the KL coefficient stays fixed or follows the adaptive controller (objective.adaptive_kl,
target_kl, kl_horizon; Ziegler et al., 2019). The value function is a head on the policy or
a separate network (config.value.source, training/rl/policy.py).

Figures of an iteration (train/*): score, kl (k1, per reply), kl_penalty (the configured
estimator, per reply), kl_coef, entropy, clip_fraction, approx_kl, value_loss,
explained_variance, response_length, stop_rate, answer_accuracy.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from objectives import ppo as ppo_lib
from training.rl.algorithm import Algorithm
from training.rl.policy import policy_outputs


def ppo_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """PPO loss of a minibatch of reply rows (arrays of `make_batch`), unpacked or packed
  (training/rl/packing.py: the per-token arrays then span every target position, and the
  token-mean loss needs nothing else)."""
  del rng, frozen
  log_probs, logits, values = policy_outputs(model, batch, batch["mask"].shape[1])
  return ppo_lib.ppo_loss(log_probs, batch["old_log_probs"], batch["advantages"], batch["mask"],
                          clip_eps=cfg.clip_eps, values=values, old_values=batch["old_values"],
                          returns=batch["returns"], value_clip=cfg.value_clip,
                          vf_coef=cfg.vf_coef, token_entropy=ppo_lib.entropy(logits),
                          entropy_coef=cfg.entropy_coef,
                          importance_weights=batch.get("importance_weights"))


@functools.partial(jax.jit, static_argnames=("estimator", "gamma", "lam", "whiten"))
def advantages_and_returns(scores, log_probs, ref_log_probs, values, mask, kl_coef, *,
                           estimator: str, gamma: float, lam: float, whiten: bool):
  """(advantages, returns, per-reply KL penalty sums, explained variance of V_old)."""
  kl = ppo_lib.kl_estimate(log_probs, ref_log_probs, estimator) * mask
  rewards = ppo_lib.token_rewards(scores, kl, mask, kl_coef)
  advantages, returns = ppo_lib.gae(rewards, values, mask, gamma=gamma, lam=lam)
  if whiten:
    advantages = ppo_lib.whiten(advantages, mask)
  return (advantages, returns, kl.sum(-1),
          ppo_lib.explained_variance(values, returns, mask))


def make_batch(rollout, config: ml_collections.ConfigDict, kl_coef: float):
  obj = config.objective
  advantages, returns, kl, ev = jax.device_get(advantages_and_returns(
      rollout.scores, rollout.log_probs, rollout.ref_log_probs, rollout.values, rollout.mask,
      np.float32(kl_coef), estimator=obj.kl_estimator, gamma=float(obj.gamma),
      lam=float(obj.lam), whiten=bool(obj.whiten_advantages)))
  arrays = dict(rollout.batch_rows(np.arange(len(rollout.mask))), mask=rollout.mask,
                old_log_probs=rollout.log_probs, old_values=rollout.values,
                advantages=np.asarray(advantages), returns=np.asarray(returns))
  figures = {"kl_penalty": float(np.mean(kl)), "kl_coef": float(kl_coef),
             "non_score_reward": -float(kl_coef) * float(np.mean(kl)),
             "explained_variance": float(ev),
             "returns": float((returns * rollout.mask).sum() / rollout.mask.sum())}
  return arrays, figures


def next_kl_coef(config: ml_collections.ConfigDict, kl_coef: float, figures: dict,
                 episodes: int) -> float:
  obj = config.objective
  if not obj.adaptive_kl:
    return kl_coef
  return ppo_lib.adaptive_kl_coef(kl_coef, figures["kl_penalty"], target=obj.target_kl,
                                  horizon=obj.kl_horizon, n_steps=episodes)


def value_source(config: ml_collections.ConfigDict) -> str:
  if config.value.source not in ("head", "model"):
    raise ValueError(f"PPO needs a value function: config.value.source 'head' or 'model', got "
                     f"{config.value.source!r}")
  return config.value.source


ALGORITHM = Algorithm(name="ppo", loss_fn=ppo_forward, make_batch=make_batch,
                      value_source=value_source,
                      next_kl_coef=next_kl_coef)

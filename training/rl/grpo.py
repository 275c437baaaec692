"""GRPO and RLOO: G replies per prompt, group baselines, clipped policy updates, no value model.

One iteration (training/rl/loop.py): sample `rl.samples_per_prompt` = G replies for each of
`rl.prompts_per_iteration` prompts (a group is G consecutive rows), score them, then here

    A_i = group-normalised score (grpo) or score minus the mean of the other G - 1 (rloo),
          the same for every token of reply i            (objectives/grpo.py)
    then `rl.epochs` x `rl.minibatches` steps of the clipped loss, plus
    objective.kl_coef x k3 KL(pi || pi_ref) per token when kl_coef > 0,
    aggregated per `objective.loss_level` ('sequence' | 'token').

Figures (train/*): score, kl (k1 per reply), clip_fraction, approx_kl, zero_advantage_groups
(the share of groups whose G scores are all equal: no learning signal), response_length,
stop_rate, answer_accuracy.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from objectives import grpo as grpo_lib
from training.rl.algorithm import Algorithm
from training.rl.policy import policy_outputs


def grpo_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """GRPO / RLOO loss of a minibatch of reply rows (arrays of `make_batch`)."""
  del rng, frozen
  log_probs, _, _ = policy_outputs(model, batch, batch["mask"].shape[1])
  return grpo_lib.grpo_loss(log_probs, batch["old_log_probs"], batch["advantages"],
                            batch["mask"], clip_eps=cfg.clip_eps,
                            ref_log_probs=batch["ref_log_probs"], kl_coef=cfg.kl_coef,
                            level=cfg.loss_level)


def sequence_advantages(scores: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """`[B]` advantages of rows grouped G at a time."""
  g = config.rl.samples_per_prompt
  groups = np.asarray(scores, np.float32).reshape(-1, g)
  if config.objective.name == "rloo":
    advantages = grpo_lib.leave_one_out_advantages(groups)
  else:
    advantages = grpo_lib.group_advantages(groups,
                                           normalize_std=config.objective.normalize_std)
  return np.asarray(advantages).reshape(-1)


def make_batch(rollout, config: ml_collections.ConfigDict, kl_coef: float):
  del kl_coef  # GRPO's KL weight is objective.kl_coef, inside the loss
  advantages = sequence_advantages(rollout.scores, config)
  g = config.rl.samples_per_prompt
  groups = rollout.scores.reshape(-1, g)
  arrays = dict(rollout.batch_rows(np.arange(len(rollout.mask))), mask=rollout.mask,
                old_log_probs=rollout.log_probs, ref_log_probs=rollout.ref_log_probs,
                advantages=(advantages[:, None] * rollout.mask).astype(np.float32))
  figures = {"zero_advantage_groups": float(np.mean(groups.max(-1) == groups.min(-1))),
             "advantage_abs": float(np.mean(np.abs(advantages)))}
  return arrays, figures


def _check_groups(config: ml_collections.ConfigDict) -> str:
  if config.rl.samples_per_prompt < 2:
    raise ValueError(f"{config.objective.name} needs config.rl.samples_per_prompt >= 2, got "
                     f"{config.rl.samples_per_prompt}")
  return "none"


GRPO = Algorithm(name="grpo", loss_fn=grpo_forward, make_batch=make_batch,
                 value_source=_check_groups)
RLOO = Algorithm(name="rloo", loss_fn=grpo_forward, make_batch=make_batch,
                 value_source=_check_groups)

"""GRPO, its successors and RLOO: G replies per prompt, group baselines, no value model.

One iteration (training/rl/loop.py): sample `rl.samples_per_prompt` = G replies for each of
`rl.prompts_per_iteration` prompts (a group is G consecutive rows), score them, then here

    A_i = group-normalised score (grpo: with the population or sample std,
          objective.std_ddof, or none, objective.normalize_std) or score minus the mean of the
          other G - 1 (rloo), the same for every token of reply i     (objectives/grpo.py)
    then `rl.epochs` x `rl.minibatches` steps of the loss of `objective.loss_type` (grpo |
    bnpo | dr_grpo | dapo | gspo | cispo: policy term and aggregation, `objective.loss_level`
    overriding the latter when set) with clip bounds `clip_eps_low` / `clip_eps_high`, plus
    objective.kl_coef x k3 KL(pi || pi_ref) per token when kl_coef > 0.

The loss reads log pi_old from the batch's `old_log_probs`; an on-policy single update gets
none (training/rl/loop.py skips that forward pass) and takes its own log-probs under
stop_gradient instead, which gives the same loss and gradient.

With `rl.dynamic_sampling` (DAPO) the batch holds groups with a signal only, unless the cap on
extra sampling rounds left slots to groups of equal scores: those rows are masked out of the
loss here, as DAPO's objective sums over groups with a signal only.

Figures (train/*): score, kl (k1 per reply), clip_fraction, approx_kl, ref_kl,
zero_advantage_groups (the share of the batch's groups whose G scores are all equal: no
learning signal), response_length, stop_rate, answer_accuracy; with dynamic sampling
extra_rounds, zero_signal_drawn, filled_groups, drawn_score (training/rl/rollout.py).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from objectives import grpo as grpo_lib
from training.rl.algorithm import Algorithm
from training.rl.packing import is_packed
from training.rl.policy import policy_outputs
from training.rl.rollout import informative_groups


def grpo_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """The GRPO-family loss of a minibatch of reply rows (arrays of `make_batch`)."""
  del rng, frozen
  width = batch["mask"].shape[1]
  log_probs, _, _ = policy_outputs(model, batch, width)
  old_log_probs = batch.get("old_log_probs")
  if old_log_probs is None:  # on-policy: pi_old is this very pass
    old_log_probs = jax.lax.stop_gradient(log_probs)
  # Packed rows (training/rl/packing.py): answers are the targets' segments.
  packed = is_packed(batch)
  return grpo_lib.grpo_loss(log_probs, old_log_probs, batch["advantages"], batch["mask"],
                            clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                            ref_log_probs=batch["ref_log_probs"], kl_coef=cfg.kl_coef,
                            loss_type=cfg.loss_type, level=cfg.loss_level or None,
                            segment_ids=batch["segment_ids"][:, -width:] if packed else None,
                            budget=batch["budget"] if packed else None,
                            importance_weights=batch.get("importance_weights"))


def sequence_advantages(scores: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """`[B]` advantages of rows grouped G at a time."""
  g = config.rl.samples_per_prompt
  groups = np.asarray(scores, np.float32).reshape(-1, g)
  if config.objective.name == "rloo":
    advantages = grpo_lib.leave_one_out_advantages(groups)
  else:
    advantages = grpo_lib.group_advantages(groups,
                                           normalize_std=config.objective.normalize_std,
                                           std_ddof=config.objective.std_ddof)
  return np.asarray(advantages).reshape(-1)


def make_batch(rollout, config: ml_collections.ConfigDict, kl_coef: float):
  del kl_coef  # GRPO's KL weight is objective.kl_coef, inside the loss
  g = config.rl.samples_per_prompt
  advantages = sequence_advantages(rollout.scores, config)
  signal = informative_groups(rollout.scores, g)
  mask = rollout.mask
  if config.rl.dynamic_sampling:
    mask = mask * np.repeat(signal, g)[:, None].astype(np.float32)
  arrays = dict(rollout.batch_rows(np.arange(len(mask))), mask=mask,
                ref_log_probs=rollout.ref_log_probs,
                advantages=(advantages[:, None] * mask).astype(np.float32))
  if rollout.log_probs is not None:
    arrays["old_log_probs"] = rollout.log_probs
  figures = {"zero_advantage_groups": float(np.mean(~signal)),
             "advantage_abs": float(np.mean(np.abs(advantages)))}
  return arrays, figures


def _check_groups(config: ml_collections.ConfigDict) -> str:
  if config.rl.samples_per_prompt < 2:
    raise ValueError(f"{config.objective.name} needs config.rl.samples_per_prompt >= 2, got "
                     f"{config.rl.samples_per_prompt}")
  if config.objective.loss_type not in grpo_lib.LOSS_TYPES:
    raise ValueError(f"config.objective.loss_type: unknown {config.objective.loss_type!r} "
                     f"({' | '.join(grpo_lib.LOSS_TYPES)})")
  return "none"


GRPO = Algorithm(name="grpo", loss_fn=grpo_forward, make_batch=make_batch,
                 value_source=_check_groups, reuses_log_probs=True)
RLOO = Algorithm(name="rloo", loss_fn=grpo_forward, make_batch=make_batch,
                 value_source=_check_groups, reuses_log_probs=True)

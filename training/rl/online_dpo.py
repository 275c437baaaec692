"""Online DPO: preference pairs sampled from the current policy each round, ranked by reward.

One round (training/rl/loop.py): sample `rl.samples_per_prompt` = G >= 2 replies per prompt
from the current policy, score them (reward function and / or reward model), and pair each
prompt's best reply (chosen) with its worst (rejected); prompts whose replies all score the
same give no pair (masked). Then `rl.epochs` x `rl.minibatches` steps of the DPO-family loss
of objectives/dpo.py (`objective.loss_type`, beta, ...) against the frozen reference, whose
sequence log-probs were computed in the rollout (Guo et al., 2024, "Direct Language Model
Alignment from Online AI Feedback"; Calandriello et al., 2024, "Human Alignment of Large
Language Models through Online Preference Optimisation").

Figures (train/*): score, kl (k1 per reply, over all G samples), pairs (share of prompts that
gave a pair), chosen_score, rejected_score, and the DPO metrics (rewards/accuracies, margins).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from objectives.dpo import Hyper, PairLogps, dpo_loss
from training.rl.algorithm import Algorithm
from training.rl.policy import policy_outputs

_ROW_FIELDS = ("tokens", "positions", "segment_ids", "mask")


def online_dpo_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """DPO loss of a minibatch of pairs: one forward pass over chosen and rejected rows."""
  del rng, frozen
  n = batch["chosen_mask"].shape[0]
  rows = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
          for k in _ROW_FIELDS}
  log_probs, _, _ = policy_outputs(model, rows, rows["mask"].shape[1])
  sums = jnp.sum(jnp.where(rows["mask"] > 0, log_probs, 0.0), axis=-1)
  lengths = jnp.sum(rows["mask"], axis=-1)
  logps = PairLogps(sums[:n], sums[n:], batch["ref_chosen"][:, 0], batch["ref_rejected"][:, 0],
                    lengths[:n], lengths[n:])
  hyper = Hyper(beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                simpo_gamma=cfg.simpo_gamma, orpo_lambda=cfg.orpo_lambda)
  return dpo_loss(logps, batch["pair_mask"][:, 0], loss_type=cfg.loss_type, hyper=hyper)


def best_and_worst(scores: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row indices of each group's best and worst reply (first on ties) and whether they differ.

  Args:
    scores: `[N * G]` scores, groups of G consecutive rows.
  Returns:
    (chosen `[N]`, rejected `[N]` row indices, valid `[N]` bool: best score > worst).
  """
  groups = np.asarray(scores).reshape(-1, g)
  offsets = np.arange(len(groups)) * g
  best, worst = groups.argmax(-1), groups.argmin(-1)
  valid = groups.max(-1) > groups.min(-1)
  return offsets + best, offsets + worst, valid


def make_batch(rollout, config: ml_collections.ConfigDict, kl_coef: float):
  del kl_coef
  chosen, rejected, valid = best_and_worst(rollout.scores, config.rl.samples_per_prompt)
  arrays = {}
  for side, index in (("chosen", chosen), ("rejected", rejected)):
    for k, v in rollout.batch_rows(index).items():
      arrays[f"{side}_{k}"] = v
    arrays[f"{side}_mask"] = rollout.mask[index]
    arrays[f"ref_{side}"] = rollout.ref_log_probs[index].sum(-1, keepdims=True)
  arrays["pair_mask"] = valid.astype(np.float32)[:, None]
  figures = {"pairs": float(valid.mean())}
  if valid.any():
    figures.update(chosen_score=float(rollout.scores[chosen][valid].mean()),
                   rejected_score=float(rollout.scores[rejected][valid].mean()))
  return arrays, figures


def _check_groups(config: ml_collections.ConfigDict) -> str:
  if config.rl.samples_per_prompt < 2:
    raise ValueError("online DPO needs config.rl.samples_per_prompt >= 2 replies per prompt")
  return "none"


ALGORITHM = Algorithm(name="online_dpo", loss_fn=online_dpo_forward, make_batch=make_batch,
                      value_source=_check_groups, units="pairs")

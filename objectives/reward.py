"""Reward modelling: the Bradley-Terry loss on scalar rewards of chosen and rejected answers.

With r_w, r_l the rewards of the chosen and rejected answer of a pair and m >= 0 an optional
per-pair margin (how much better the chosen answer is, from the data), the loss per pair is

    loss = -log sigma(r_w - r_l - m)  +  eta (r_w + r_l)^2

The first term is the negative log-likelihood of the preference under the Bradley-Terry model
(Bradley & Terry, 1952), as used for RLHF reward models (Ouyang et al., 2022, "Training
language models to follow instructions with human feedback", eq. 1); the margin is Llama 2's
(Touvron et al., 2023, sec. 3.2.2). The second, with coefficient eta (0: off), is reward
centering: Bradley-Terry only fixes reward differences, so it pulls each pair's rewards
towards zero mean (Eisenstein et al., 2023, "Helping or Herding? Reward Model Ensembles
Mitigate but do not Eliminate Reward Hacking").

Metrics: `accuracy` (chosen reward higher; a tie counts 1/2), `margin` (r_w - r_l), `chosen`
and `rejected` (mean rewards), `bt_loss` (the first term alone); all `(sum, pairs)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.dpo import preference_accuracy
from objectives.reductions import Metrics, weighted_sum


def bradley_terry_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                       mask: jax.Array, *, margin: jax.Array | None = None,
                       center_coef: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Bradley-Terry loss with optional margin and centering term.

  Args:
    chosen_rewards: `[...]` scalar reward of each pair's chosen answer.
    rejected_rewards: `[...]` reward of its rejected answer.
    mask: `[...]`, 1 for a real pair, 0 for an empty slot (ignored even if nan).
    margin: `[...]` per-pair margin m (None: 0).
    center_coef: eta, the weight of the (r_w + r_l)^2 centering term.

  Returns:
    per_pair: `[...]` float32 loss, 0 where masked.
    metrics: `(sum, weight)` pairs weighted by the mask: `loss`, `bt_loss`, `accuracy`,
      `margin`, `chosen`, `rejected`.
  """
  r_w = jnp.asarray(chosen_rewards, jnp.float32)
  r_l = jnp.asarray(rejected_rewards, jnp.float32)
  m = 0.0 if margin is None else jnp.asarray(margin, jnp.float32)
  bt = -jax.nn.log_sigmoid(r_w - r_l - m)
  loss = bt + center_coef * jnp.square(r_w + r_l)
  mask = jnp.asarray(mask, jnp.float32)
  metrics = {
      "loss": weighted_sum(loss, mask),
      "bt_loss": weighted_sum(bt, mask),
      "accuracy": weighted_sum(preference_accuracy(r_w, r_l), mask),
      "margin": weighted_sum(r_w - r_l, mask),
      "chosen": weighted_sum(r_w, mask),
      "rejected": weighted_sum(r_l, mask),
  }
  return jnp.where(mask > 0, loss, 0.0), metrics

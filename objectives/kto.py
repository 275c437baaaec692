"""KTO: preference optimisation from unpaired desirable / undesirable examples.

Kahneman-Tversky Optimisation (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization", eq. 8). With the policy's log-ratio on an example,

    r = log pi(y|x) - log pi_ref(y|x),

and the reference point z0 = max(0, KL(pi || pi_ref)), estimated on the batch and not
differentiated through, the loss per example is

    desirable:    lambda_D (1 - sigma(beta (r - z0)))
    undesirable:  lambda_U (1 - sigma(beta (z0 - r)))

The paper estimates z0 from mismatched pairs (x_i, y_j), j != i: completions the prompt did
not produce, so their log-ratio measures how far the policy has drifted rather than what it
learnt about y_i. `kl_reference_point` takes those mismatched log-probs; the data pipeline puts
one mismatched completion next to each example (data/preferences.py). The estimate is over the
batch (one micro-batch with gradient accumulation), as in the paper's implementation.
lambda_D / lambda_U rebalance unequal numbers of desirable and undesirable examples
(the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

Metrics: `rewards/chosen` and `logps/chosen` average over desirable examples,
`rewards/rejected` and `logps/rejected` over undesirable ones (rewards are beta r), `kl` is z0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.reductions import Metrics, weighted_sum


def kl_reference_point(policy_logps: jax.Array, reference_logps: jax.Array,
                       mask: jax.Array) -> jax.Array:
  """z0 = max(0, mean(log pi - log pi_ref)) over the masked mismatched completions, a scalar
  with no gradient.

  Args:
    policy_logps: `[...]` log pi(y'|x) of mismatched completions y'.
    reference_logps: `[...]` log pi_ref(y'|x).
    mask: `[...]`, 1 where a mismatched completion exists.
  """
  total, count = weighted_sum(jnp.asarray(policy_logps) - jnp.asarray(reference_logps), mask)
  return jax.lax.stop_gradient(jnp.maximum(total / jnp.maximum(count, 1.0), 0.0))


def kto_loss(policy_logps: jax.Array, reference_logps: jax.Array, desirable: jax.Array,
             mask: jax.Array, *, kl: jax.Array, beta: float = 0.1,
             desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[jax.Array, Metrics]:
  """The KTO loss per example.

  Args:
    policy_logps: `[...]` log pi(y|x), summed over completion tokens.
    reference_logps: `[...]` log pi_ref(y|x).
    desirable: `[...]` bool (or 0/1): the example's label.
    mask: `[...]`, 1 for a real example (others ignored, even if nan).
    kl: scalar reference point z0 (`kl_reference_point`).
    beta: temperature of the value function.
    desirable_weight: lambda_D.
    undesirable_weight: lambda_U.

  Returns:
    per_example: `[...]` float32 loss, 0 where masked.
    metrics: `(sum, weight)` pairs: `loss` (weight: examples), `rewards/chosen`,
      `logps/chosen` (weight: desirable examples), `rewards/rejected`, `logps/rejected`
      (weight: undesirable examples), `kl`.
  """
  policy_logps = jnp.asarray(policy_logps, jnp.float32)
  ratio = policy_logps - jnp.asarray(reference_logps, jnp.float32)
  good = jnp.asarray(desirable).astype(bool)
  value = jnp.where(good, desirable_weight * jax.nn.sigmoid(beta * (ratio - kl)),
                    undesirable_weight * jax.nn.sigmoid(beta * (kl - ratio)))
  loss = jnp.where(good, desirable_weight, undesirable_weight) - value
  mask = jnp.asarray(mask, jnp.float32)
  good_mask, bad_mask = mask * good, mask * (~good)
  rewards = beta * ratio
  metrics = {
      "loss": weighted_sum(loss, mask),
      "rewards/chosen": weighted_sum(rewards, good_mask),
      "rewards/rejected": weighted_sum(rewards, bad_mask),
      "logps/chosen": weighted_sum(policy_logps, good_mask),
      "logps/rejected": weighted_sum(policy_logps, bad_mask),
      "kl": (jnp.asarray(kl, jnp.float32), jnp.ones((), jnp.float32)),
  }
  return jnp.where(mask > 0, loss, 0.0), metrics

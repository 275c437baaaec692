"""GRPO / RLOO advantages and the clipped, KL-penalised loss at sequence and token level."""

import math

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

from objectives import grpo, ppo
from objectives.reductions import finalize_metrics


def test_group_advantages_hand_computed():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]])
  adv = grpo.group_advantages(rewards, eps=1e-4)
  # Group 0: mean 0.5, population std 0.5. Group 1: all equal -> 0 (no signal).
  np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, -0.5, 0.5]) / 0.5001, rtol=1e-6)
  np.testing.assert_array_equal(adv[1], [0, 0, 0, 0])
  std = math.sqrt((2.0 ** 2 + 1 + 1 + 0) / 4)  # mean 1
  np.testing.assert_allclose(adv[2], np.array([2.0, -1.0, -1.0, 0.0]) / (std + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(grpo.group_advantages(rewards, normalize_std=False)[2],
                             [2.0, -1.0, -1.0, 0.0], rtol=1e-6)


def test_leave_one_out_advantages_hand_computed():
  adv = grpo.leave_one_out_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 5.0, 7.0]]))
  np.testing.assert_allclose(adv[0], [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], rtol=1e-6)
  # 3 - (1 + 5 + 7) / 3, ...: equals G / (G - 1) (r - mean).
  np.testing.assert_allclose(adv[1], [3 - 13 / 3, 1 - 5, 5 - 11 / 3, 7 - 3], rtol=1e-6)
  np.testing.assert_allclose(adv[1], 4 / 3 * (np.array([3, 1, 5, 7]) - 4), rtol=1e-6)
  with pytest.raises(ValueError, match="G >= 2"):
    grpo.leave_one_out_advantages(np.ones((2, 1)))


def test_token_weights():
  mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
  np.testing.assert_array_equal(grpo.token_weights(mask, "token"), mask)
  seq = grpo.token_weights(mask, "sequence")
  np.testing.assert_allclose(seq, [[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0.25] * 4])
  assert float(seq.sum()) == 3.0  # one per reply
  with pytest.raises(ValueError, match="level"):
    grpo.token_weights(mask, "group")


MASK = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
ADV = np.array([2.0, -1.0], np.float32)


def test_grpo_loss_levels_hand_computed_at_ratio_one():
  logp = np.array([[-0.5, -1.0, -3.0], [-2.0, -0.1, -0.1]], np.float32)
  for level, want in (("sequence", ((-2 - 2) / 2 + 1) / 2), ("token", (-2 - 2 + 1) / 3)):
    per_token, metrics = grpo.grpo_loss(logp, logp, ADV, MASK, clip_eps=0.2, level=level)
    m = finalize_metrics(metrics)
    assert float(m["loss"]) == pytest.approx(want)
    assert float(m["ratio"]) == 1.0 and float(m["clip_fraction"]) == 0.0
    np.testing.assert_array_equal(per_token, [[-2, -2, 0], [1, 0, 0]])
  _, metrics = grpo.grpo_loss(logp, logp, ADV, MASK, clip_eps=0.2, level="sequence")
  assert float(metrics["loss"][1]) == 2.0  # weight counts replies


def test_grpo_loss_with_k3_kl_penalty():
  logp = np.array([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]], np.float32)
  ref = np.array([[-1.0, -0.5, 0.0], [-1.0, 0.0, 0.0]], np.float32)
  k3 = lambda r: math.exp(-r) - 1 + r  # r = log pi - log pi_ref
  kls = [[k3(0.5), k3(-0.5)], [k3(-1.0)]]
  per_token, metrics = grpo.grpo_loss(logp, logp, ADV, MASK, clip_eps=0.2, ref_log_probs=ref,
                                      kl_coef=0.1, level="token")
  np.testing.assert_allclose(per_token[0, :2], [-2 + 0.1 * kls[0][0], -2 + 0.1 * kls[0][1]],
                             rtol=1e-5)
  np.testing.assert_allclose(per_token[1, 0], 1 + 0.1 * kls[1][0], rtol=1e-5)
  m = finalize_metrics(metrics)
  assert float(m["ref_kl"]) == pytest.approx((kls[0][0] + kls[0][1] + kls[1][0]) / 3, rel=1e-5)
  with pytest.raises(ValueError, match="ref_log_probs"):
    grpo.grpo_loss(logp, logp, ADV, MASK, clip_eps=0.2, kl_coef=0.1)


def test_grpo_clipping_reuses_ppo_and_masking_equals_subset():
  rng = np.random.default_rng(1)
  logp = rng.normal(-1, 0.4, (2, 3)).astype(np.float32)
  old = rng.normal(-1, 0.4, (2, 3)).astype(np.float32)
  per_token, metrics = grpo.grpo_loss(logp, old, ADV, MASK, clip_eps=0.2, level="sequence")
  pg, _, _ = ppo.policy_loss(logp, old, ADV[:, None] * np.ones((1, 3)), clip_eps=0.2)
  np.testing.assert_allclose(per_token, pg * MASK, rtol=1e-6)
  want = (pg[0, :2].mean() + pg[1, 0]) / 2
  assert float(finalize_metrics(metrics)["loss"]) == pytest.approx(float(want), rel=1e-5)
  # nan beyond the mask changes nothing; per-row sums add up.
  poisoned = np.where(MASK > 0, logp, np.nan)
  _, masked = grpo.grpo_loss(poisoned, old, ADV, MASK, clip_eps=0.2, level="sequence")
  _, row0 = grpo.grpo_loss(logp[:1], old[:1], ADV[:1], MASK[:1], clip_eps=0.2, level="sequence")
  _, row1 = grpo.grpo_loss(logp[1:], old[1:], ADV[1:], MASK[1:], clip_eps=0.2, level="sequence")
  for k in metrics:
    assert float(masked[k][0]) == pytest.approx(float(metrics[k][0]), rel=1e-6)
    assert float(row0[k][0] + row1[k][0]) == pytest.approx(float(metrics[k][0]), rel=1e-5)
  _, jitted = jax.jit(lambda a: grpo.grpo_loss(a, old, ADV, MASK, clip_eps=0.2))(logp)
  assert float(jitted["loss"][0]) == pytest.approx(float(metrics["loss"][0]), rel=1e-6)


def test_grpo_loss_gradients():
  old = np.array([[-0.5, -1.0, -2.0], [-2.0, -0.3, -0.3]], np.float32)
  ref = old - 0.2
  loss = lambda lp: grpo.grpo_loss(lp, old, ADV, MASK, clip_eps=0.2, ref_log_probs=ref,
                                   kl_coef=0.1, level="sequence")[1]["loss"][0]
  check_grads(loss, (old + 0.05,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  # Analytic: weight_t (-A rho + beta (1 - exp(-(lp - ref)))) for unclipped tokens.
  lp = old + 0.05
  w = grpo.token_weights(MASK, "sequence")
  want = w * (-ADV[:, None] * np.exp(0.05) + 0.1 * (1 - np.exp(-(lp - ref))))
  np.testing.assert_allclose(jax.grad(loss)(lp), want, rtol=1e-4, atol=1e-6)

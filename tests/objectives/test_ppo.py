"""PPO's pure pieces against hand-computed values: KL estimators, rewards, GAE, whitening,
clipped losses, entropy, explained variance, the adaptive KL controller."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from objectives import ppo
from objectives.reductions import finalize_metrics


def test_kl_estimators_hand_computed():
  logp, ref = np.array([-1.0, -2.0]), np.array([-1.5, -1.0])  # r = [0.5, -1.0]
  np.testing.assert_allclose(ppo.kl_estimate(logp, ref, "k1"), [0.5, -1.0], rtol=1e-6)
  np.testing.assert_allclose(ppo.kl_estimate(logp, ref, "k2"), [0.125, 0.5], rtol=1e-6)
  np.testing.assert_allclose(ppo.kl_estimate(logp, ref, "k3"),
                             [math.exp(-0.5) - 0.5, math.e - 2.0], rtol=1e-6)
  # Equal policies: every estimator is exactly 0; k3 stays >= 0 and accurate for tiny r.
  for k in ppo.KL_ESTIMATORS:
    assert float(jnp.abs(ppo.kl_estimate(logp, logp, k)).max()) == 0.0
  assert float(ppo.kl_estimate(1e-4, 0.0, "k3")) == pytest.approx(0.5e-8, rel=1e-3)
  with pytest.raises(ValueError, match="k4"):
    ppo.kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_kl_estimates():
  # Samples of p = (0.7, 0.3) scored against q = (0.4, 0.6): both estimators average to KL.
  p, q = np.array([0.7, 0.3]), np.array([0.4, 0.6])
  kl = float(np.sum(p * np.log(p / q)))
  for k in ("k1", "k3"):
    expected = np.sum(p * np.asarray(ppo.kl_estimate(np.log(p), np.log(q), k)))
    assert float(expected) == pytest.approx(kl, rel=1e-5)


def test_token_rewards_put_the_score_on_the_last_token():
  kl = np.array([[0.1, 0.2, 0.3], [0.5, 0.7, 9.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  rewards = ppo.token_rewards(np.array([2.0, -1.0]), kl, mask, 0.5)
  np.testing.assert_allclose(rewards, [[-0.05, -0.1, -0.15 + 2.0], [-0.25, -0.35 - 1.0, 0.0]],
                             rtol=1e-6)
  np.testing.assert_array_equal(ppo.last_token_mask(mask), [[0, 0, 1], [0, 1, 0]])


GAMMA, LAM = 0.9, 0.8
REWARDS = np.array([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]], np.float32)
VALUES = np.array([[0.5, 0.4, 0.3], [0.1, 0.2, 9.0]], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)


def test_gae_hand_computed():
  advantages, returns = ppo.gae(REWARDS, VALUES, MASK, gamma=GAMMA, lam=LAM)
  # Row 0: deltas 0.9*0.4-0.5 = -0.14, 0.9*0.3-0.4 = -0.13, 1-0.3 = 0.7; A_t = delta_t +
  # 0.72 A_{t+1}. Row 1 ends after two tokens (its third reward and value are ignored).
  a0 = [-0.14 + 0.72 * (-0.13 + 0.72 * 0.7), -0.13 + 0.72 * 0.7, 0.7]
  a1 = [0.2 + 0.9 * 0.2 - 0.1 + 0.72 * 0.8, 0.8, 0.0]
  np.testing.assert_allclose(advantages, [a0, a1], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(returns, np.array([a0, a1]) + VALUES * MASK, rtol=1e-5, atol=1e-7)
  jitted = jax.jit(lambda r, v, m: ppo.gae(r, v, m, gamma=GAMMA, lam=LAM))(REWARDS, VALUES, MASK)
  np.testing.assert_allclose(jitted[0], advantages, rtol=1e-6)


def test_gae_limits_and_masking_equals_subset():
  # lambda = gamma = 1: Monte-Carlo return minus the value.
  adv, ret = ppo.gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(ret[0], [1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(adv[1, :2], [1.2 - 0.1, 1.0 - 0.2], rtol=1e-6)
  # lambda = 0: one-step TD errors.
  adv, _ = ppo.gae(REWARDS, VALUES, MASK, gamma=GAMMA, lam=0.0)
  np.testing.assert_allclose(adv[0], [-0.14, -0.13, 0.7], rtol=1e-5)
  # The padded row equals the same row alone, truncated.
  alone, _ = ppo.gae(REWARDS[1:, :2], VALUES[1:, :2], MASK[1:, :2], gamma=GAMMA, lam=LAM)
  padded, _ = ppo.gae(REWARDS, VALUES, MASK, gamma=GAMMA, lam=LAM)
  np.testing.assert_allclose(padded[1, :2], alone[0], rtol=1e-6)


def test_whiten_uses_masked_entries_only():
  x = np.array([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  std = math.sqrt(1.25)  # population std of 1, 2, 3, 4 (mean 2.5)
  want = np.array([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / std
  np.testing.assert_allclose(ppo.whiten(x, mask, eps=0.0), want, rtol=1e-6)
  kept = ppo.whiten(x, mask, shift_mean=False, eps=0.0)
  np.testing.assert_allclose(kept[0], want[0] + 2.5, rtol=1e-6)
  assert float(ppo.masked_mean(ppo.whiten(x, mask), mask)) == pytest.approx(0.0, abs=1e-6)


def test_policy_loss_hand_computed():
  ratios = np.array([0.5, 1.1, 1.5, 0.7], np.float32)
  advantages = np.array([1.0, 1.0, 1.0, -1.0], np.float32)
  loss, ratio, clipped = ppo.policy_loss(np.log(ratios), np.zeros(4), advantages, clip_eps=0.2)
  # max(-A r, -A clip(r, 0.8, 1.2)): -0.5 (r < 1 - eps with A > 0 is not clipped), -1.1,
  # -1.2 (clipped), 0.8 (r < 1 - eps with A < 0: clipped).
  np.testing.assert_allclose(loss, [-0.5, -1.1, -1.2, 0.8], rtol=1e-6)
  np.testing.assert_allclose(ratio, ratios, rtol=1e-6)
  np.testing.assert_array_equal(clipped, [0, 0, 1, 1])


def test_ratio_is_exactly_one_when_the_policy_has_not_moved():
  logp = np.array([[-0.3, -2.7, -1.1]], np.float32)
  adv = np.array([[0.5, -1.5, 2.0]], np.float32)
  mask = np.array([[1, 1, 0]], np.float32)
  per_token, metrics = jax.jit(lambda lp: ppo.ppo_loss(lp, lp, adv, mask, clip_eps=0.2))(logp)
  m = finalize_metrics(metrics)
  assert float(m["ratio"]) == 1.0
  assert float(m["clip_fraction"]) == 0.0 and float(m["approx_kl"]) == 0.0
  np.testing.assert_array_equal(per_token, [[-0.5, 1.5, 0.0]])


def test_value_loss_hand_computed():
  values = np.array([1.0, 0.0, 0.6], np.float32)
  old = np.array([0.5, 0.5, 0.5], np.float32)
  returns = np.array([2.0, 0.0, 2.0], np.float32)
  loss, clipped = ppo.value_loss(values, old, returns, clip=0.2)
  # Clipped values 0.7, 0.3, 0.6: 0.5 max(1, 1.69), 0.5 max(0, 0.09), 0.5 * 1.96.
  np.testing.assert_allclose(loss, [0.845, 0.045, 0.98], rtol=1e-5)
  np.testing.assert_array_equal(clipped, [1, 1, 0])
  unclipped, _ = ppo.value_loss(values, old, returns, clip=0.0)
  np.testing.assert_allclose(unclipped, [0.5, 0.0, 0.98], rtol=1e-5)


def test_entropy_and_explained_variance():
  logits = np.log(np.array([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 1e-30]]))
  np.testing.assert_allclose(ppo.entropy(logits), [math.log(4), 1.5 * math.log(2)], rtol=1e-5)
  returns = np.array([[1.0, 2.0, 3.0, 9.0]], np.float32)
  mask = np.array([[1, 1, 1, 0]], np.float32)
  assert float(ppo.explained_variance(returns, returns, mask)) == pytest.approx(1.0)
  assert float(ppo.explained_variance(np.full_like(returns, 5.0), returns, mask)) == \
      pytest.approx(0.0, abs=1e-6)
  # V = (1, 1, 1): Var[G - V] = Var[G] = 2/3 -> 0; V = (2, 2, 2) the same; V = (1, 2, 2):
  # errors (0, 0, 1), variance 2/9 -> 1 - (2/9) / (2/3) = 2/3.
  half = np.array([[1.0, 2.0, 2.0, 0.0]], np.float32)
  assert float(ppo.explained_variance(half, returns, mask)) == pytest.approx(2 / 3, rel=1e-5)


def test_adaptive_kl_controller():
  # Ziegler et al.: e = clip(KL / target - 1, -0.2, 0.2), coef *= 1 + e n / H.
  assert ppo.adaptive_kl_coef(0.1, 9.0, target=6.0, horizon=10000, n_steps=256) == \
      pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
  assert ppo.adaptive_kl_coef(0.1, 6.6, target=6.0, horizon=100, n_steps=10) == \
      pytest.approx(0.1 * (1 + 0.1 * 0.1))
  assert ppo.adaptive_kl_coef(0.1, 6.0, target=6.0, horizon=100, n_steps=10) == 0.1
  assert ppo.adaptive_kl_coef(0.1, 0.0, target=6.0, horizon=100, n_steps=10) == \
      pytest.approx(0.1 * (1 - 0.2 * 0.1))


def _loss_inputs():
  rng = np.random.default_rng(0)
  shape = (3, 4)
  return dict(log_probs=rng.normal(-1.0, 0.3, shape).astype(np.float32),
              old_log_probs=rng.normal(-1.0, 0.3, shape).astype(np.float32),
              advantages=rng.normal(size=shape).astype(np.float32),
              mask=np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.float32),
              values=rng.normal(size=shape).astype(np.float32),
              old_values=rng.normal(size=shape).astype(np.float32),
              returns=rng.normal(size=shape).astype(np.float32),
              token_entropy=rng.uniform(0, 2, shape).astype(np.float32))


def test_ppo_loss_combines_terms_same_under_jit_and_masking_equals_subset():
  x = _loss_inputs()
  kw = dict(clip_eps=0.2, value_clip=0.3, vf_coef=0.5, entropy_coef=0.01)
  per_token, metrics = ppo.ppo_loss(**x, **kw)
  pg, _, _ = ppo.policy_loss(x["log_probs"], x["old_log_probs"], x["advantages"], clip_eps=0.2)
  vf, _ = ppo.value_loss(x["values"], x["old_values"], x["returns"], clip=0.3)
  want = (pg + 0.5 * vf - 0.01 * x["token_entropy"]) * x["mask"]
  np.testing.assert_allclose(per_token, want, rtol=1e-5, atol=1e-7)
  assert float(metrics["loss"][0]) == pytest.approx(float(want.sum()), rel=1e-5)
  assert float(metrics["loss"][1]) == 7.0
  _, jitted = jax.jit(lambda a: ppo.ppo_loss(**a, **kw))(x)
  for k in metrics:
    np.testing.assert_allclose(jitted[k][0], metrics[k][0], rtol=1e-5, atol=1e-7)
  # Masked tokens change nothing, even if their inputs are nan.
  poisoned = {k: np.where(x["mask"] > 0, v, np.nan) if k != "mask" else v for k, v in x.items()}
  _, masked = ppo.ppo_loss(**poisoned, **kw)
  subset = {k: v[:1] for k, v in x.items()}
  _, first = ppo.ppo_loss(**subset, **kw)
  rest = {k: v[1:] for k, v in x.items()}
  _, others = ppo.ppo_loss(**rest, **kw)
  for k in metrics:
    assert float(masked[k][0]) == pytest.approx(float(metrics[k][0]), rel=1e-5, abs=1e-6)
    assert float(first[k][0] + others[k][0]) == pytest.approx(float(metrics[k][0]), rel=1e-5,
                                                              abs=1e-6)


def test_ppo_loss_gradients():
  x = _loss_inputs()
  # Ratios inside the clip range and values inside the value clip: smooth everywhere.
  x["log_probs"] = x["old_log_probs"] + 0.05
  x["values"] = x["old_values"] + 0.1
  loss = lambda lp, v: ppo.ppo_loss(lp, x["old_log_probs"], x["advantages"], x["mask"],
                                    clip_eps=0.2, values=v, old_values=x["old_values"],
                                    returns=x["returns"], value_clip=0.3, vf_coef=0.5)[1]["loss"][0]
  check_grads(loss, (x["log_probs"], x["values"]), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  # d loss / d log pi = -A rho on unclipped tokens, 0 on clipped and masked ones.
  grad = jax.grad(loss)(x["log_probs"], x["values"])
  want = -x["advantages"] * np.exp(0.05) * x["mask"]
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
  far = x["old_log_probs"] + 1.0  # ratio e > 1 + eps: clipped where A > 0
  grad = jax.grad(loss)(far, x["values"])
  np.testing.assert_allclose(grad, np.where(x["advantages"] > 0, 0.0, -x["advantages"] * np.e)
                             * x["mask"], rtol=1e-4, atol=1e-6)

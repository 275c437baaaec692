"""The GRPO family (grpo, bnpo, dr_grpo, dapo, gspo, cispo) and RLOO against float64 references.

Each loss type is checked against a numpy float64 transcription of its paper's formula
(objectives/grpo.py), with masking (nan beyond the mask changes nothing), under jit, under
gradient accumulation (micro-batches' (sum, weight) pairs add up to the whole batch's loss),
through its gradients, and on-policy: old log-probs taken as the current ones under
stop_gradient give the loss and gradient of a separate pass.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from objectives import grpo, ppo
from objectives.reductions import add_metrics, finalize_metrics


def test_group_advantages_hand_computed():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]])
  adv = grpo.group_advantages(rewards, eps=1e-4)
  # Group 0: mean 0.5, population std 0.5. Group 1: all equal -> 0 (no signal).
  np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, -0.5, 0.5]) / 0.5001, rtol=1e-6)
  np.testing.assert_array_equal(adv[1], [0, 0, 0, 0])
  std = math.sqrt((2.0 ** 2 + 1 + 1 + 0) / 4)  # mean 1
  np.testing.assert_allclose(adv[2], np.array([2.0, -1.0, -1.0, 0.0]) / (std + 1e-4), rtol=1e-6)
  # Dr. GRPO: centred only.
  np.testing.assert_allclose(grpo.group_advantages(rewards, normalize_std=False)[2],
                             [2.0, -1.0, -1.0, 0.0], rtol=1e-6)


def test_group_advantages_sample_std():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 1.0]])
  adv = grpo.group_advantages(rewards, std_ddof=1, eps=1e-4)
  # Bessel: sum of squares / (G - 1): group 0 1/3, group 1 6/3.
  np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-4),
                             rtol=1e-6)
  np.testing.assert_allclose(adv[1], np.array([2.0, -1.0, -1.0, 0.0]) / (math.sqrt(2) + 1e-4),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="std_ddof"):
    grpo.group_advantages(rewards, std_ddof=2)


def test_leave_one_out_advantages_hand_computed():
  adv = grpo.leave_one_out_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 5.0, 7.0]]))
  np.testing.assert_allclose(adv[0], [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], rtol=1e-6)
  # 3 - (1 + 5 + 7) / 3, ...: equals G / (G - 1) (r - mean).
  np.testing.assert_allclose(adv[1], [3 - 13 / 3, 1 - 5, 5 - 11 / 3, 7 - 3], rtol=1e-6)
  np.testing.assert_allclose(adv[1], 4 / 3 * (np.array([3, 1, 5, 7]) - 4), rtol=1e-6)
  with pytest.raises(ValueError, match="G >= 2"):
    grpo.leave_one_out_advantages(np.ones((2, 1)))


def test_token_weights_and_normalisers():
  mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(grpo.token_weights(mask, "token"), mask)
  seq = grpo.token_weights(mask, "sequence")
  np.testing.assert_allclose(seq, [[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0.25] * 4, [0] * 4])
  np.testing.assert_allclose(grpo.token_weights(mask, "constant"), mask / 4)
  ones = np.ones_like(mask)
  # (sum, weight): answers for sequence and constant (the empty row is none), tokens for token.
  assert [tuple(map(float, grpo.aggregate(ones, mask, level))) for level in grpo.LEVELS] == [
      (3.0, 3.0), (7.0, 7.0), (7 / 4, 3.0)]
  with pytest.raises(ValueError, match="level"):
    grpo.token_weights(mask, "group")


# --- The loss family against float64 references ----------------------------------------------

# Four answers of budget L = 4 (lengths 2, 1, 4, 3); log-probs that move the ratio far enough
# from 1 for every clip to bind somewhere.
MASK = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
ADV = np.array([1.5, -1.0, 0.5, -2.0], np.float32)
_rng = np.random.default_rng(0)
OLD = _rng.normal(-1.2, 0.5, MASK.shape).astype(np.float32)
LOGP = (OLD + _rng.normal(0.0, 0.25, MASK.shape)
        + np.array([[0.2], [-0.15], [0.0], [0.05]])).astype(np.float32)
REF = (OLD + _rng.normal(0.0, 0.3, MASK.shape)).astype(np.float32)
# Each loss type's policy term and aggregation, written out here rather than read from the
# module, so a changed table fails.
KINDS = {"grpo": ("clip", "sequence"), "bnpo": ("clip", "token"),
         "dr_grpo": ("clip", "constant"), "dapo": ("clip", "token"),
         "gspo": ("sequence", "sequence"), "cispo": ("cispo", "token")}


def reference_loss(loss_type, lp, old, ref, adv, mask, *, low, high, beta):
  """float64 (per-token loss, aggregated loss) of the module docstring's formulas."""
  lp, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (lp, old, ref, adv, mask))
  policy, level = KINDS[loss_type]
  a = adv[:, None] * np.ones_like(mask)
  lengths = mask.sum(-1, keepdims=True)
  if policy == "clip":
    rho = np.exp(lp - old)
    per_token = np.maximum(-a * rho, -a * np.clip(rho, 1 - low, 1 + high))
  elif policy == "sequence":
    s = np.exp(((lp - old) * mask).sum(-1, keepdims=True) / lengths)
    per_token = np.maximum(-a * s, -a * np.clip(s, 1 - low, 1 + high)) * np.ones_like(mask)
  else:
    per_token = -np.minimum(np.exp(lp - old), 1 + high) * a * lp
  x = lp - ref
  per_token = (per_token + beta * (np.exp(-x) - 1 + x)) * mask
  n = float((lengths > 0).sum())
  if level == "sequence":
    total = (per_token.sum(-1) / np.maximum(lengths[:, 0], 1)).sum() / n
  elif level == "token":
    total = per_token.sum() / mask.sum()
  else:
    total = per_token.sum() / (n * mask.shape[1])
  return per_token, total


def _loss(loss_type, lp=LOGP, old=OLD, mask=MASK, adv=ADV, ref=REF, **kw):
  kw = dict(dict(clip_eps_low=0.1, clip_eps_high=0.15, kl_coef=0.05), **kw)
  return grpo.grpo_loss(lp, old, adv, mask, ref_log_probs=ref, loss_type=loss_type, **kw)


def test_the_loss_types_table():
  assert {k: tuple(v) for k, v in grpo.LOSS_TYPES.items()} == KINDS
  with pytest.raises(ValueError, match="unknown GRPO loss_type"):
    _loss("ppo")


@pytest.mark.parametrize("loss_type", sorted(KINDS))
def test_loss_matches_float64_reference_masked_and_jitted(loss_type):
  per_token, metrics = _loss(loss_type)
  want_tokens, want = reference_loss(loss_type, LOGP, OLD, REF, ADV, MASK, low=0.1, high=0.15,
                                     beta=0.05)
  np.testing.assert_allclose(per_token, want_tokens, rtol=2e-5, atol=1e-6)
  assert float(finalize_metrics(metrics)["loss"]) == pytest.approx(want, rel=2e-5)
  # Some ratio is clipped (each term's clip is exercised), not all.
  assert 0 < float(finalize_metrics(metrics)["clip_fraction"]) < 1
  # nan beyond the mask changes nothing, in any input.
  poison = lambda x: np.where(MASK > 0, x, np.nan).astype(np.float32)
  poisoned_tokens, poisoned = _loss(loss_type, lp=poison(LOGP), old=poison(OLD), ref=poison(REF))
  np.testing.assert_array_equal(poisoned_tokens, per_token)
  for key in metrics:
    np.testing.assert_array_equal(poisoned[key], metrics[key])
  _, jitted = jax.jit(lambda lp: _loss(loss_type, lp=lp))(LOGP)
  np.testing.assert_allclose(jitted["loss"], metrics["loss"], rtol=1e-6)


@pytest.mark.parametrize("loss_type", sorted(KINDS))
def test_micro_batches_add_up_to_the_whole_batch(loss_type):
  """Gradient accumulation: (sum, weight) pairs of any row split add up to the whole batch's
  loss and gradient (training/step.py divides the summed gradient by the summed weight)."""
  loss_of = lambda rows: lambda lp: _loss(loss_type, lp=lp, old=OLD[rows], mask=MASK[rows],
                                          adv=ADV[rows], ref=REF[rows])[1]["loss"]
  whole = loss_of(slice(None))(LOGP)
  grad_whole = jax.grad(lambda lp: loss_of(slice(None))(lp)[0] / loss_of(slice(None))(lp)[1])(
      LOGP)
  for split in ([[0, 2], [1, 3]], [[0], [1, 2, 3]], [[3], [2], [1], [0]]):
    total = {"loss": (0.0, 0.0)}
    for rows in split:
      total = add_metrics(total, {"loss": loss_of(rows)(LOGP[rows])})
    total = total["loss"]
    np.testing.assert_allclose(total, whole, rtol=1e-6)
    grad = np.zeros_like(LOGP)
    for rows in split:
      grad[rows] = jax.grad(lambda lp, rows=rows: loss_of(rows)(lp)[0])(LOGP[rows])
    np.testing.assert_allclose(grad / float(total[1]), grad_whole, rtol=1e-5, atol=1e-7)
  # Averaging per-micro-batch means instead is not the token-level loss (the halves hold 3
  # and 7 tokens); the answer-level ones survive it here only because both halves hold two
  # answers of the same budget.
  halves = [loss_of(rows)(LOGP[rows]) for rows in ([0, 1], [2, 3])]
  naive = np.mean([float(s / w) for s, w in halves])
  assert (naive == pytest.approx(float(whole[0] / whole[1]), rel=1e-6)) == (
      loss_type in ("dr_grpo", "grpo", "gspo"))


@pytest.mark.parametrize("loss_type", sorted(set(KINDS) - {"cispo"}))
def test_gradients(loss_type):
  loss = lambda lp: _loss(loss_type, lp=lp)[1]["loss"][0]
  check_grads(loss, (LOGP,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_cispo_gradient_is_the_weighted_reinforce_gradient():
  # Not the derivative of its value (the weight is held constant), so no finite differences:
  # -sg(min(rho, 1 + eps_high)) A grad log pi, plus the k3 penalty's beta (1 - pi_ref / pi),
  # over the batch's tokens.
  grad = jax.grad(lambda lp: _loss("cispo", lp=lp)[1]["loss"][0])(LOGP)
  lp, old, ref = (np.asarray(x, np.float64) for x in (LOGP, OLD, REF))
  want = (-np.minimum(np.exp(lp - old), 1.15) * ADV[:, None]
          + 0.05 * (1 - np.exp(ref - lp))) * MASK
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", sorted(KINDS))
def test_on_policy_every_type_is_reinforce_and_reusing_log_probs_is_exact(loss_type):
  """At pi_old = pi every gradient is -A w_t / W per token (w, W the aggregation's), and the
  current log-probs under stop_gradient as pi_old give the loss and gradient of a separate
  pass (training/rl: the skipped old-log-prob forward)."""
  separate = lambda lp: _loss(loss_type, lp=lp, old=LOGP, kl_coef=0.0)[1]["loss"]
  reused = lambda lp: _loss(loss_type, lp=lp, old=jax.lax.stop_gradient(lp),
                            kl_coef=0.0)[1]["loss"]
  np.testing.assert_array_equal(reused(LOGP), separate(LOGP))
  grad_separate = jax.grad(lambda lp: separate(lp)[0])(LOGP)
  np.testing.assert_array_equal(jax.grad(lambda lp: reused(lp)[0])(LOGP), grad_separate)
  level = KINDS[loss_type][1]
  want = -ADV[:, None] * np.asarray(grpo.token_weights(MASK, level))
  np.testing.assert_allclose(grad_separate, want, rtol=1e-5, atol=1e-7)


def test_clip_higher_keeps_the_gradient_of_a_rising_token():
  # One token, A = 1, rho = 1.25: clipped at eps 0.2 (no gradient), not at DAPO's 0.28.
  lp, old, mask, adv = np.log([[1.25]]), np.zeros((1, 1)), np.ones((1, 1)), np.ones(1)
  grad = lambda high: float(jax.grad(lambda x: grpo.grpo_loss(
      x, old, adv, mask, clip_eps_low=0.2, clip_eps_high=high, loss_type="dapo")[1]["loss"][0])(
          lp)[0, 0])
  assert grad(0.2) == 0.0
  assert grad(0.28) == pytest.approx(-1.25, rel=1e-6)  # -A rho
  # And a falling token (A < 0, rho 0.7) is still clipped below at 1 - 0.2.
  _, m = grpo.grpo_loss(np.log([[0.7]]), old, -adv, mask, clip_eps_low=0.2, clip_eps_high=0.28,
                        loss_type="dapo")
  assert float(m["clip_fraction"][0]) == 1.0 and float(m["loss"][0]) == pytest.approx(0.8)


def test_gspo_clips_whole_answers_on_the_length_normalised_ratio():
  # Log-ratios 0.1 and -0.3 over a two-token answer: s = exp(-0.1) ~ 0.905 for both tokens.
  lp, old = np.array([[0.1, -0.3, 5.0]]), np.zeros((1, 3))
  mask = np.array([[1.0, 1.0, 0.0]])
  per_token, m = grpo.grpo_loss(lp, old, np.array([-1.0]), mask, clip_eps_low=0.2,
                                loss_type="gspo")
  s = math.exp(-0.1)
  np.testing.assert_allclose(per_token, [[s, s, 0.0]], rtol=1e-6)  # -A s, inside the clip
  assert float(finalize_metrics(m)["ratio"]) == pytest.approx(s)
  _, m = grpo.grpo_loss(lp, old, np.array([-1.0]), mask, clip_eps_low=0.05, loss_type="gspo")
  # Clipped at 0.95 below for A < 0: the whole answer is clipped, and the loss is 0.95.
  assert float(finalize_metrics(m)["clip_fraction"]) == 1.0
  assert float(finalize_metrics(m)["loss"]) == pytest.approx(0.95)


def test_cispo_caps_the_weight_but_keeps_every_gradient():
  # rho = 1.5 > 1 + 0.28 with A = 2: weight 1.28, gradient -1.28 A (PPO's clip would cut it);
  # rho = 0.5: no lower bound, weight 0.5.
  lp = np.log([[0.3, 0.1]]) + np.log([[1.5, 0.5]])
  old, mask = np.log([[0.3, 0.1]]), np.ones((1, 2))
  loss = lambda x: grpo.grpo_loss(x, old, np.array([2.0]), mask, clip_eps_low=0.2,
                                  clip_eps_high=0.28, loss_type="cispo")
  per_token, m = loss(lp)
  np.testing.assert_allclose(per_token, [[-1.28 * 2 * lp[0, 0], -0.5 * 2 * lp[0, 1]]],
                             rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: loss(x)[1]["loss"][0])(lp),
                             [[-1.28 * 2, -0.5 * 2]], rtol=1e-6)
  assert float(finalize_metrics(m)["clip_fraction"]) == 0.5


def test_kl_penalty_and_reply_kl():
  logp = np.array([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]], np.float32)
  ref = np.array([[-1.0, -0.5, 0.0], [-1.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  adv = np.array([2.0, -1.0], np.float32)
  k3 = lambda r: math.exp(-r) - 1 + r  # r = log pi - log pi_ref
  kls = [[k3(0.5), k3(-0.5)], [k3(-1.0)]]
  per_token, metrics = grpo.grpo_loss(logp, logp, adv, mask, clip_eps_low=0.2,
                                      ref_log_probs=ref, kl_coef=0.1, loss_type="bnpo")
  np.testing.assert_allclose(per_token[0, :2], [-2 + 0.1 * kls[0][0], -2 + 0.1 * kls[0][1]],
                             rtol=1e-5)
  np.testing.assert_allclose(per_token[1, 0], 1 + 0.1 * kls[1][0], rtol=1e-5)
  m = finalize_metrics(metrics)
  assert float(m["ref_kl"]) == pytest.approx((kls[0][0] + kls[0][1] + kls[1][0]) / 3, rel=1e-5)
  # k1 per answer: (0.5 - 0.5 + -1.0) / 2 answers.
  assert float(m["reply_kl"]) == pytest.approx(-0.5, rel=1e-6)
  assert float(metrics["reply_kl"][1]) == 2.0
  with pytest.raises(ValueError, match="ref_log_probs"):
    grpo.grpo_loss(logp, logp, adv, mask, clip_eps_low=0.2, kl_coef=0.1)


def test_clip_term_is_ppo_and_level_overrides_the_loss_type():
  per_token, metrics = _loss("grpo", kl_coef=0.0, level="token")
  pg, _, _ = ppo.policy_loss(LOGP, OLD, ADV[:, None] * MASK, clip_eps=0.1, clip_eps_high=0.15)
  np.testing.assert_allclose(per_token, pg * MASK, rtol=1e-6)
  np.testing.assert_array_equal(metrics["loss"], _loss("bnpo", kl_coef=0.0)[1]["loss"])
  # ppo.policy_loss without clip_eps_high is symmetric, as before.
  sym, _, _ = ppo.policy_loss(LOGP, OLD, ADV[:, None], clip_eps=0.1)
  both, _, _ = ppo.policy_loss(LOGP, OLD, ADV[:, None], clip_eps=0.1, clip_eps_high=0.1)
  np.testing.assert_array_equal(sym, both)
  with pytest.raises(ValueError, match="level"):
    _loss("grpo", level="group")
  assert jnp.asarray(per_token).dtype == jnp.float32

"""DPO-family losses and the packed-pair helpers against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from objectives import dpo
from objectives import pairs
from objectives.dpo import Hyper, PairLogps
from objectives.reductions import finalize_metrics

# Three pairs: policy / reference sequence log-probs and completion lengths.
CHOSEN = np.array([-4.0, -6.0, -3.0], np.float32)
REJECTED = np.array([-5.0, -5.5, -9.0], np.float32)
REF_CHOSEN = np.array([-4.5, -5.0, -3.0], np.float32)
REF_REJECTED = np.array([-4.0, -6.0, -8.0], np.float32)
CHOSEN_TOKENS = np.array([2.0, 3.0, 1.0], np.float32)
REJECTED_TOKENS = np.array([5.0, 2.0, 3.0], np.float32)
LOGPS = PairLogps(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS)
MASK = np.ones(3, np.float32)


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def _h(i):
  """The log-ratio margin of pair i, in float64."""
  return (float(CHOSEN[i]) - float(REF_CHOSEN[i])) - (float(REJECTED[i]) - float(REF_REJECTED[i]))


def _expected(loss_type, hp, i):
  b, eps = hp.beta, hp.label_smoothing
  if loss_type == "sigmoid":
    return -(1 - eps) * _log_sigmoid(b * _h(i)) - eps * _log_sigmoid(-b * _h(i))
  if loss_type == "hinge":
    return max(0.0, 1 - b * _h(i))
  if loss_type == "ipo":
    return (_h(i) - 1 / (2 * b)) ** 2
  if loss_type == "ipo_mean":
    # The log-ratio of each answer averaged over its tokens, in float64.
    h_mean = ((float(CHOSEN[i]) - float(REF_CHOSEN[i])) / float(CHOSEN_TOKENS[i])
              - (float(REJECTED[i]) - float(REF_REJECTED[i])) / float(REJECTED_TOKENS[i]))
    return (h_mean - 1 / (2 * b)) ** 2
  if loss_type == "robust":
    return ((1 - eps) * -_log_sigmoid(b * _h(i)) - eps * -_log_sigmoid(-b * _h(i))) / (1 - 2 * eps)
  a_w = float(CHOSEN[i]) / float(CHOSEN_TOKENS[i])
  a_l = float(REJECTED[i]) / float(REJECTED_TOKENS[i])
  if loss_type == "simpo":
    return -_log_sigmoid(b * a_w - b * a_l - hp.simpo_gamma)
  odds = lambda a: a - math.log(1 - math.exp(a))
  return -a_w + hp.orpo_lambda * -_log_sigmoid(odds(a_w) - odds(a_l))


HYPER = Hyper(beta=0.5, label_smoothing=0.2, simpo_gamma=0.3, orpo_lambda=0.7)


@pytest.mark.parametrize("loss_type", sorted(dpo.LOSSES))
def test_losses_hand_computed_and_jit(loss_type):
  per_pair, metrics = dpo.dpo_loss(LOGPS, MASK, loss_type=loss_type, hyper=HYPER)
  want = [_expected(loss_type, HYPER, i) for i in range(3)]
  np.testing.assert_allclose(per_pair, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"][0], sum(want), rtol=1e-5)
  assert float(metrics["loss"][1]) == 3.0
  jitted = jax.jit(lambda l, m: dpo.dpo_loss(l, m, loss_type=loss_type, hyper=HYPER))
  per_pair_jit, metrics_jit = jitted(LOGPS, MASK)
  np.testing.assert_allclose(per_pair_jit, per_pair, rtol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(metrics_jit[key][0], metrics[key][0], rtol=1e-6)


def test_reward_metrics_hand_computed():
  _, metrics = dpo.dpo_loss(LOGPS, MASK, loss_type="sigmoid", hyper=HYPER)
  got = finalize_metrics(metrics)
  r_w = 0.5 * (CHOSEN - REF_CHOSEN)      # [0.25, -0.5, 0]
  r_l = 0.5 * (REJECTED - REF_REJECTED)  # [-0.5, 0.25, -0.5]
  np.testing.assert_allclose(got["rewards/chosen"], r_w.mean(), rtol=1e-6)
  np.testing.assert_allclose(got["rewards/rejected"], r_l.mean(), rtol=1e-6)
  np.testing.assert_allclose(got["rewards/margins"], (r_w - r_l).mean(), rtol=1e-6)
  np.testing.assert_allclose(got["rewards/accuracies"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(got["logps/chosen"], CHOSEN.mean(), rtol=1e-6)
  np.testing.assert_allclose(got["logps/rejected"], REJECTED.mean(), rtol=1e-6)
  # SimPO's rewards are beta times the mean token log-prob.
  got = finalize_metrics(dpo.dpo_loss(LOGPS, MASK, loss_type="simpo", hyper=HYPER)[1])
  np.testing.assert_allclose(got["rewards/chosen"], (0.5 * CHOSEN / CHOSEN_TOKENS).mean(),
                             rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_policy_equal_to_reference(loss_type):
  same = PairLogps(CHOSEN, REJECTED, CHOSEN, REJECTED)
  hp = Hyper(beta=0.1, label_smoothing=0.2)
  per_pair, metrics = dpo.dpo_loss(same, MASK, loss_type=loss_type, hyper=hp)
  want = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0,
          "ipo": 1 / (4 * 0.1 ** 2)}[loss_type]
  np.testing.assert_allclose(per_pair, [want] * 3, rtol=1e-6)
  got = finalize_metrics(metrics)
  assert float(got["rewards/margins"]) == 0.0
  assert float(got["rewards/chosen"]) == 0.0 == float(got["rewards/rejected"])
  assert float(got["rewards/accuracies"]) == 0.5  # all ties


def test_ipo_mean_is_ipo_on_per_token_log_ratios():
  # Pair 0: chosen log-ratio 0.5 over 2 tokens, rejected -1.0 over 5: h_mean = 0.25 + 0.2.
  per_pair, metrics = dpo.dpo_loss(LOGPS, MASK, loss_type="ipo_mean", hyper=Hyper(beta=0.1))
  assert float(per_pair[0]) == pytest.approx((0.45 - 5.0) ** 2, rel=1e-6)
  # Rewards are beta times the per-token log-ratio.
  np.testing.assert_allclose(finalize_metrics(metrics)["rewards/chosen"],
                             np.mean(0.1 * (CHOSEN - REF_CHOSEN) / CHOSEN_TOKENS), rtol=1e-6)
  # One-token answers: the summed form; twice the tokens at the same per-token log-ratios:
  # the same loss (the summed form's margin doubles).
  ones = LOGPS._replace(chosen_tokens=np.ones(3, np.float32),
                        rejected_tokens=np.ones(3, np.float32))
  np.testing.assert_allclose(dpo.dpo_loss(ones, MASK, loss_type="ipo_mean")[0],
                             dpo.dpo_loss(ones, MASK, loss_type="ipo")[0], rtol=1e-6)
  double = PairLogps(*(2 * np.asarray(x) for x in LOGPS))
  np.testing.assert_allclose(dpo.dpo_loss(double, MASK, loss_type="ipo_mean")[0],
                             dpo.dpo_loss(LOGPS, MASK, loss_type="ipo_mean")[0], rtol=1e-6)
  assert not np.allclose(dpo.dpo_loss(double, MASK, loss_type="ipo")[0],
                         dpo.dpo_loss(LOGPS, MASK, loss_type="ipo")[0])
  with pytest.raises(ValueError, match="completion lengths"):
    dpo.dpo_loss(LOGPS._replace(chosen_tokens=None), MASK, loss_type="ipo_mean")


def test_special_cases_reduce_to_plain_dpo():
  plain = dpo.dpo_loss(LOGPS, MASK, loss_type="sigmoid", hyper=Hyper(beta=0.5))[0]
  robust0 = dpo.dpo_loss(LOGPS, MASK, loss_type="robust", hyper=Hyper(beta=0.5))[0]
  np.testing.assert_allclose(robust0, plain, rtol=1e-6)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo.dpo_loss(LOGPS, MASK, loss_type="robust", hyper=Hyper(label_smoothing=0.5))


def test_simpo_is_length_normalised_and_reference_free():
  # Twice the tokens at the same mean log-prob: the same loss. No reference is needed.
  base = PairLogps(CHOSEN, REJECTED, chosen_tokens=CHOSEN_TOKENS,
                   rejected_tokens=REJECTED_TOKENS)
  double = PairLogps(2 * CHOSEN, 2 * REJECTED, chosen_tokens=2 * CHOSEN_TOKENS,
                     rejected_tokens=2 * REJECTED_TOKENS)
  a = dpo.dpo_loss(base, MASK, loss_type="simpo", hyper=HYPER)[0]
  b = dpo.dpo_loss(double, MASK, loss_type="simpo", hyper=HYPER)[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match="reference"):
    dpo.dpo_loss(base, MASK, loss_type="sigmoid")
  with pytest.raises(ValueError, match="unknown DPO loss_type"):
    dpo.dpo_loss(LOGPS, MASK, loss_type="dpo")


def test_log_odds_stable_near_certainty():
  np.testing.assert_allclose(dpo.log_odds(jnp.log(0.25)), math.log(1 / 3), rtol=1e-6)
  assert np.isfinite(float(dpo.log_odds(0.0)))  # p = 1: capped, not inf
  assert np.isfinite(float(jax.grad(dpo.log_odds)(-1e-9)))


@pytest.mark.parametrize("loss_type", sorted(dpo.LOSSES))
def test_gradients(loss_type):
  def total(chosen, rejected):
    logps = LOGPS._replace(chosen=chosen, rejected=rejected)
    return dpo.dpo_loss(logps, MASK, loss_type=loss_type, hyper=HYPER)[1]["loss"][0]
  check_grads(total, (CHOSEN, REJECTED), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_sigmoid_gradient_analytic():
  # d/d log pi(y_w) of -log sigma(beta h) = -beta sigma(-beta h); the rejected side mirrors it.
  hp = Hyper(beta=0.5)
  grad_w, grad_l = jax.grad(
      lambda w, l: dpo.dpo_loss(LOGPS._replace(chosen=w, rejected=l), MASK,
                                loss_type="sigmoid", hyper=hp)[1]["loss"][0],
      argnums=(0, 1))(CHOSEN, REJECTED)
  want = [-0.5 / (1 + math.exp(0.5 * _h(i))) for i in range(3)]
  np.testing.assert_allclose(grad_w, want, rtol=1e-5)
  np.testing.assert_allclose(grad_l, [-g for g in want], rtol=1e-5)


@pytest.mark.parametrize("loss_type", sorted(dpo.LOSSES))
def test_masking_equals_subset(loss_type):
  mask = np.array([1.0, 0.0, 1.0], np.float32)
  poisoned = LOGPS._replace(chosen=np.array([-4.0, np.nan, -3.0], np.float32))
  _, masked = dpo.dpo_loss(poisoned, mask, loss_type=loss_type, hyper=HYPER)
  subset = PairLogps(*(x[[0, 2]] for x in LOGPS))
  _, want = dpo.dpo_loss(subset, np.ones(2), loss_type=loss_type, hyper=HYPER)
  for key in want:
    np.testing.assert_allclose(masked[key][0], want[key][0], rtol=1e-6)
    np.testing.assert_allclose(masked[key][1], want[key][1])


# --- Packed pair helpers ---------------------------------------------------------------------

# Row 0: pair (segments 1, 2) and pair (3, 4), then padding; row 1: one pair.
SEGMENTS = np.array([[1, 1, 2, 2, 2, 3, 4, 4, 0],
                     [1, 1, 1, 2, 2, 0, 0, 0, 0]], np.int32)
SIDES = np.array([[1, 1, 2, 2, 2, 1, 2, 2, 0],
                  [1, 1, 1, 2, 2, 0, 0, 0, 0]], np.int32)
VALUES = np.arange(18, dtype=np.float32).reshape(2, 9)


def test_segment_sums_last_token_and_pairs():
  sums = pairs.segment_sums(VALUES, SEGMENTS)
  np.testing.assert_allclose(sums[0, :4], [0 + 1, 2 + 3 + 4, 5, 6 + 7])
  np.testing.assert_allclose(sums[1, :2], [9 + 10 + 11, 12 + 13])
  assert not sums[:, 4:].any() and not sums[1, 2:].any()
  last = pairs.last_token_mask(SEGMENTS)
  assert np.flatnonzero(last[0]).tolist() == [1, 4, 5, 7]
  assert np.flatnonzero(last[1]).tolist() == [2, 4]
  np.testing.assert_allclose(pairs.segment_last(VALUES, SEGMENTS)[0, :4], [1, 4, 5, 7])
  first, second = pairs.split_pairs(sums)
  assert first.shape == (2, 5)  # ceil(9 / 2) slots
  np.testing.assert_allclose(first[0, :2], [1, 5])
  np.testing.assert_allclose(second[0, :2], [9, 13])
  assert pairs.pair_mask(SIDES, SEGMENTS).tolist() == [
      [True, True, False, False, False], [True, False, False, False, False]]
  # Integer fields (example ids) stay exact integers.
  ids = pairs.segment_last(np.full((2, 9), 2**24 + 1, np.int32) * (SEGMENTS > 0), SEGMENTS)
  assert ids.dtype == jnp.int32 and int(ids[0, 0]) == 2**24 + 1


def test_pair_mask_rejects_a_broken_layout():
  swapped = np.where(SIDES == 1, 2, np.where(SIDES == 2, 1, 0))
  assert not pairs.pair_mask(swapped, SEGMENTS).any()


def test_sequence_log_probs_masks_prompt_and_padding():
  loss_mask = np.array([[0, 1, 0, 1, 1, 1, 1, 1, 0],
                        [0, 1, 1, 1, 1, 0, 0, 0, 0]], np.float32)
  token_lp = -VALUES / 10
  token_lp[0, 0] = np.nan   # a masked prompt token
  token_lp[0, 8] = -np.inf  # padding
  seqs = jax.jit(pairs.sequence_log_probs)(token_lp, loss_mask, SEGMENTS)
  np.testing.assert_allclose(seqs.first[0, :2], [-0.1, -0.5], rtol=1e-6)
  np.testing.assert_allclose(seqs.second[0, :2], [-0.7, -1.3], rtol=1e-6)
  np.testing.assert_allclose(seqs.first[1, 0], -(1.0 + 1.1), rtol=1e-6)
  np.testing.assert_allclose(seqs.first_tokens[0, :2], [1, 1])
  np.testing.assert_allclose(seqs.second_tokens[0, :2], [2, 2])
  grad = jax.grad(lambda t: pairs.sequence_log_probs(t, loss_mask, SEGMENTS).first.sum())(
      np.where(np.isfinite(token_lp), token_lp, 0.0))
  np.testing.assert_allclose(grad, loss_mask * (SIDES == 1))

"""Bradley-Terry reward-model loss against hand-computed values."""

import math

import jax
import numpy as np
from jax.test_util import check_grads

from objectives.reductions import finalize_metrics
from objectives.reward import bradley_terry_loss

CHOSEN = np.array([1.5, -0.5, 2.0, 0.3], np.float32)
REJECTED = np.array([0.5, 0.5, 2.0, -1.0], np.float32)
MARGIN = np.array([0.0, 1.0, 0.5, 2.0], np.float32)
MASK = np.ones(4, np.float32)


def _softplus(x):
  return math.log1p(math.exp(x))


def test_hand_computed_with_margin_and_centering():
  per_pair, metrics = bradley_terry_loss(CHOSEN, REJECTED, MASK, margin=MARGIN,
                                         center_coef=0.01)
  bt = [_softplus(-(float(w) - float(l) - float(m)))
        for w, l, m in zip(CHOSEN, REJECTED, MARGIN)]
  center = [0.01 * (float(w) + float(l)) ** 2 for w, l in zip(CHOSEN, REJECTED)]
  np.testing.assert_allclose(per_pair, np.add(bt, center), rtol=1e-6)
  got = finalize_metrics(metrics)
  np.testing.assert_allclose(got["loss"], np.mean(np.add(bt, center)), rtol=1e-6)
  np.testing.assert_allclose(got["bt_loss"], np.mean(bt), rtol=1e-6)
  # Right, wrong, tie (1/2), right; margins are reported without the data margin.
  np.testing.assert_allclose(got["accuracy"], (1 + 0 + 0.5 + 1) / 4, rtol=1e-6)
  np.testing.assert_allclose(got["margin"], np.mean(CHOSEN - REJECTED), rtol=1e-6)
  np.testing.assert_allclose(got["chosen"], CHOSEN.mean(), rtol=1e-6)
  np.testing.assert_allclose(got["rejected"], REJECTED.mean(), rtol=1e-6)
  assert float(metrics["loss"][1]) == 4.0


def test_equal_rewards_give_log_2():
  per_pair, metrics = bradley_terry_loss(CHOSEN, CHOSEN, MASK)
  np.testing.assert_allclose(per_pair, [math.log(2)] * 4, rtol=1e-6)
  assert float(finalize_metrics(metrics)["accuracy"]) == 0.5


def test_jit_matches():
  f = lambda w, l, m: bradley_terry_loss(w, l, MASK, margin=m, center_coef=0.1)
  eager, jitted = f(CHOSEN, REJECTED, MARGIN), jax.jit(f)(CHOSEN, REJECTED, MARGIN)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  for key in eager[1]:
    np.testing.assert_allclose(jitted[1][key][0], eager[1][key][0], rtol=1e-6)


def test_gradients():
  total = lambda w, l: bradley_terry_loss(w, l, MASK, margin=MARGIN,
                                          center_coef=0.05)[1]["loss"][0]
  check_grads(total, (CHOSEN, REJECTED), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  # d/d r_w = -sigma(-(r_w - r_l - m)) + 2 eta (r_w + r_l); d/d r_l = sigma(.) + 2 eta (.)
  grad_w, grad_l = jax.grad(total, argnums=(0, 1))(CHOSEN, REJECTED)
  s = 1 / (1 + np.exp(CHOSEN.astype(np.float64) - REJECTED - MARGIN))
  center = 2 * 0.05 * (CHOSEN.astype(np.float64) + REJECTED)
  np.testing.assert_allclose(grad_w, -s + center, rtol=1e-5)
  np.testing.assert_allclose(grad_l, s + center, rtol=1e-5)


def test_masking_equals_subset():
  poisoned = CHOSEN.copy()
  poisoned[1] = np.nan
  mask = np.array([1, 0, 1, 1], np.float32)
  per_pair, masked = bradley_terry_loss(poisoned, REJECTED, mask, margin=MARGIN, center_coef=0.1)
  keep = [0, 2, 3]
  _, want = bradley_terry_loss(CHOSEN[keep], REJECTED[keep], np.ones(3), margin=MARGIN[keep],
                               center_coef=0.1)
  assert float(per_pair[1]) == 0.0
  for key in want:
    np.testing.assert_allclose(masked[key][0], want[key][0], rtol=1e-6)
    assert float(masked[key][1]) == 3.0

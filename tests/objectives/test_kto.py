"""KTO loss and its KL reference point against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from objectives.kto import kl_reference_point, kto_loss
from objectives.reductions import finalize_metrics

POLICY = np.array([-3.0, -7.0, -4.0, -6.0], np.float32)
REFERENCE = np.array([-4.0, -6.0, -4.5, -5.0], np.float32)
DESIRABLE = np.array([True, False, True, False])
MASK = np.ones(4, np.float32)


def _sigmoid(x):
  return 1 / (1 + math.exp(-x))


def test_hand_computed():
  kl, beta, lam_d, lam_u = 0.2, 0.5, 1.0, 1.5
  per_example, metrics = kto_loss(POLICY, REFERENCE, DESIRABLE, MASK, kl=kl, beta=beta,
                                  desirable_weight=lam_d, undesirable_weight=lam_u)
  ratio = [float(p) - float(r) for p, r in zip(POLICY, REFERENCE)]  # [1, -1, 0.5, -1]
  want = [lam_d * (1 - _sigmoid(beta * (r - kl))) if good else
          lam_u * (1 - _sigmoid(beta * (kl - r))) for r, good in zip(ratio, DESIRABLE)]
  np.testing.assert_allclose(per_example, want, rtol=1e-6)
  got = finalize_metrics(metrics)
  np.testing.assert_allclose(got["loss"], np.mean(want), rtol=1e-6)
  np.testing.assert_allclose(got["rewards/chosen"], beta * (1 + 0.5) / 2, rtol=1e-6)
  np.testing.assert_allclose(got["rewards/rejected"], beta * -1.0, rtol=1e-6)
  np.testing.assert_allclose(got["logps/chosen"], -3.5, rtol=1e-6)
  np.testing.assert_allclose(got["logps/rejected"], -6.5, rtol=1e-6)
  np.testing.assert_allclose(got["kl"], kl, rtol=1e-6)
  assert float(metrics["rewards/chosen"][1]) == 2.0 == float(metrics["rewards/rejected"][1])


def test_policy_equal_to_reference_with_zero_kl():
  # r = z0 = 0: every example's value is lambda / 2, so the loss is lambda / 2.
  per_example, _ = kto_loss(POLICY, POLICY, DESIRABLE, MASK, kl=0.0, desirable_weight=1.0,
                            undesirable_weight=3.0)
  np.testing.assert_allclose(per_example, [0.5, 1.5, 0.5, 1.5], rtol=1e-6)


def test_kl_reference_point_clamps_and_has_no_gradient():
  mask = np.array([1, 1, 0, 1], np.float32)
  z = kl_reference_point(POLICY, REFERENCE, mask)
  np.testing.assert_allclose(z, max(0.0, (1 - 1 - 1) / 3), atol=1e-7)  # mean -1/3 -> 0
  z = kl_reference_point(REFERENCE, POLICY, mask)
  np.testing.assert_allclose(z, 1 / 3, rtol=1e-6)
  assert not np.any(jax.grad(lambda p: kl_reference_point(p, REFERENCE, mask))(POLICY))
  assert float(kl_reference_point(POLICY, REFERENCE, np.zeros(4))) == 0.0


def test_jit_and_gradients():
  f = lambda p: kto_loss(p, REFERENCE, DESIRABLE, MASK, kl=jnp.float32(0.3), beta=0.5,
                         undesirable_weight=2.0)[1]["loss"][0]
  np.testing.assert_allclose(jax.jit(f)(POLICY), f(POLICY), rtol=1e-6)
  check_grads(f, (POLICY,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  # Desirable: d/dp lam_D (1 - s(b(r - z))) = -lam_D b s (1 - s); undesirable: +lam_U b s (1 - s).
  grad = jax.grad(f)(POLICY)
  ratio = POLICY.astype(np.float64) - REFERENCE
  s = 1 / (1 + np.exp(-0.5 * np.where(DESIRABLE, ratio - 0.3, 0.3 - ratio)))
  want = np.where(DESIRABLE, -1.0, 2.0) * 0.5 * s * (1 - s)
  np.testing.assert_allclose(grad, want, rtol=1e-5)


def test_masking_equals_subset():
  poisoned = POLICY.copy()
  poisoned[2] = np.nan
  mask = np.array([1, 1, 0, 1], np.float32)
  per_example, masked = kto_loss(poisoned, REFERENCE, DESIRABLE, mask, kl=0.1)
  keep = [0, 1, 3]
  _, want = kto_loss(POLICY[keep], REFERENCE[keep], DESIRABLE[keep], np.ones(3), kl=0.1)
  assert float(per_example[2]) == 0.0
  for key in want:
    np.testing.assert_allclose(masked[key][0], want[key][0], rtol=1e-6)
    np.testing.assert_allclose(masked[key][1], want[key][1])

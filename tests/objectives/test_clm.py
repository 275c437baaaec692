"""CLM loss against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from objectives.clm import clm_loss, token_nll, top1_correct
from objectives.reductions import finalize_metrics


def _log_softmax(row):
  row = np.asarray(row, np.float64)
  return row - math.log(np.exp(row).sum())


LOGITS = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]],
                   [[1.0, 1.0, 1.0], [0.0, -2.0, 4.0]]], np.float32)
TARGETS = np.array([[0, 1], [2, 2]], np.int32)


def test_loss_and_accuracy_hand_computed():
  mask = np.array([[1, 1], [1, 0]], np.float32)
  per_token, metrics = clm_loss(LOGITS, TARGETS, mask)
  expected = [[-_log_softmax(LOGITS[0, 0])[0], -_log_softmax(LOGITS[0, 1])[1]],
              [-_log_softmax(LOGITS[1, 0])[2], 0.0]]
  np.testing.assert_allclose(per_token, expected, rtol=1e-6)
  # The third token is a uniform distribution over 3: loss log 3.
  assert abs(expected[1][0] - math.log(3)) < 1e-12
  total, weight = metrics["loss"]
  np.testing.assert_allclose(total, sum(map(sum, expected)), rtol=1e-6)
  assert float(weight) == 3.0
  # argmax: row0 tok0 -> 0 (correct), row0 tok1 -> 2 (target 1, wrong), row1 tok0 -> 0
  # (ties pick the first index; target 2, wrong); the masked token does not count.
  acc_sum, acc_weight = metrics["accuracy"]
  assert (float(acc_sum), float(acc_weight)) == (1.0, 3.0)


def test_masked_tokens_contribute_nothing_even_if_nan():
  logits = LOGITS.copy()
  logits[1, 1] = np.nan
  mask = np.array([[1, 1], [1, 0]], np.float32)
  _, metrics = clm_loss(logits, TARGETS, mask)
  _, subset = clm_loss(LOGITS[:, :1], TARGETS[:, :1], mask[:, :1])
  _, first_row = clm_loss(LOGITS[:1, 1:], TARGETS[:1, 1:], mask[:1, 1:])
  np.testing.assert_allclose(metrics["loss"][0], subset["loss"][0] + first_row["loss"][0],
                             rtol=1e-6)
  assert np.isfinite(float(metrics["loss"][0]))


def test_z_loss_term():
  mask = np.ones((2, 2), np.float32)
  _, plain = clm_loss(LOGITS, TARGETS, mask)
  _, with_z = clm_loss(LOGITS, TARGETS, mask, z_loss=1e-2)
  log_z = np.array([[math.log(np.exp(r.astype(np.float64)).sum()) for r in b] for b in LOGITS])
  np.testing.assert_allclose(with_z["loss"][0] - plain["loss"][0], 1e-2 * (log_z ** 2).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(with_z["z_loss"][0], 1e-2 * (log_z ** 2).sum(), rtol=1e-5)


def test_jit_matches_and_bf16_logits_reduce_in_float32():
  mask = np.ones((2, 2), np.float32)
  eager = finalize_metrics(clm_loss(LOGITS, TARGETS, mask)[1])
  jitted = finalize_metrics(jax.jit(clm_loss)(LOGITS, TARGETS, mask)[1])
  for k in eager:
    np.testing.assert_allclose(eager[k], jitted[k], rtol=1e-6)
  per_token, _ = clm_loss(jnp.asarray(LOGITS, jnp.bfloat16), TARGETS, mask)
  assert per_token.dtype == jnp.float32


def test_gradients():
  mask = np.array([[1, 1], [1, 0]], np.float32)
  f = lambda logits: clm_loss(logits, TARGETS, mask, z_loss=1e-3)[1]["loss"][0]
  check_grads(f, (jnp.asarray(LOGITS, jnp.float64) if jax.config.jax_enable_x64 else LOGITS,),
              order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  # d nll / d logits = softmax - onehot on unmasked tokens, 0 on masked ones.
  grad = jax.grad(lambda l: clm_loss(l, TARGETS, mask)[1]["loss"][0])(LOGITS)
  probs = np.exp(_log_softmax(LOGITS[0, 0]))
  np.testing.assert_allclose(grad[0, 0], probs - np.eye(3)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grad[1, 1], 0.0)


def test_token_nll_matches_log_softmax():
  nll, log_z = token_nll(LOGITS, TARGETS)
  for b in range(2):
    for t in range(2):
      assert abs(float(nll[b, t]) + _log_softmax(LOGITS[b, t])[TARGETS[b, t]]) < 1e-5
  np.testing.assert_allclose(log_z[1, 0], 1.0 + math.log(3), rtol=1e-6)


def test_top1_correct_equals_argmax_with_ties():
  # Ties are where the two-reduction form could differ from argmax (first index wins).
  logits = np.array([[1.0, 3.0, 3.0, 0.0],     # max tied at 1 and 2: argmax is 1
                     [2.0, 2.0, 2.0, 2.0],     # all tied: argmax is 0
                     [-1.0, -5.0, -0.5, -0.5],
                     [0.0, 0.0, 7.0, 7.0]], np.float32)
  for target in range(4):
    targets = np.full((4,), target, np.int32)
    expected = (np.argmax(logits, -1) == targets).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(top1_correct(jnp.asarray(logits), targets)),
                                  expected)
  # Random rows with many ties (few distinct values), batched like a model's logits.
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, (3, 50, 16)).astype(np.float32)
  targets = rng.integers(0, 16, (3, 50)).astype(np.int32)
  targets[0] = np.argmax(logits[0], -1)              # a row of hits, checked exactly too
  got = np.asarray(jax.jit(top1_correct)(logits, targets))
  np.testing.assert_array_equal(got, (np.argmax(logits, -1) == targets).astype(np.float32))
  assert got[0].all() and 0 < got[1:].mean() < 1

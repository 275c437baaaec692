"""MLM loss: hand-computed values, jit, gradients, masking = subset, limits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from objectives.mlm import mlm_loss
from objectives.reductions import finalize_metrics

# Logits that are log-probabilities, so each nll is -log p[target] by inspection.
PROBS = np.array([[[0.5, 0.25, 0.125, 0.125],     # target 0: nll log 2, argmax right
                   [0.1, 0.2, 0.3, 0.4],          # target 2: nll -log 0.3, argmax wrong
                   [0.7, 0.1, 0.1, 0.1]]],        # not selected
                 np.float32)
LOGITS = np.log(PROBS)
TARGETS = np.array([[0, 2, 3]], np.int32)
MASK = np.array([[1, 1, 0]], np.float32)


def test_hand_computed():
  per_token, metrics = mlm_loss(LOGITS, TARGETS, MASK, token_mask=np.ones_like(MASK))
  np.testing.assert_allclose(per_token, [[math.log(2), -math.log(0.3), 0.0]], rtol=1e-6)
  loss_sum, weight = metrics["loss"]
  np.testing.assert_allclose(loss_sum, math.log(2) - math.log(0.3), rtol=1e-6)
  assert float(weight) == 2.0
  assert tuple(map(float, metrics["masked_accuracy"])) == (1.0, 2.0)
  np.testing.assert_allclose(metrics["mask_rate"], (2.0, 3.0))
  final = finalize_metrics(metrics)
  np.testing.assert_allclose(final["loss"], (math.log(2) - math.log(0.3)) / 2, rtol=1e-6)
  assert "mask_rate" not in mlm_loss(LOGITS, TARGETS, MASK)[1]


def test_same_under_jit():
  eager = mlm_loss(LOGITS, TARGETS, MASK, token_mask=np.ones_like(MASK))
  jitted = jax.jit(mlm_loss)(LOGITS, TARGETS, MASK, token_mask=np.ones_like(MASK))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def test_gradients():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float64)
  targets = rng.integers(0, 7, (2, 5))
  mask = (rng.random((2, 5)) < 0.5).astype(np.float64)
  loss = lambda x: mlm_loss(x, targets, mask)[1]["loss"][0]
  # The objective computes in float32 whatever the input: first order, float32 tolerances.
  check_grads(loss, (jnp.asarray(logits, jnp.float32),), order=1, modes=("rev",), eps=1e-2,
              atol=1e-2, rtol=1e-2)
  # d loss_sum / d logits = mask * (softmax - onehot).
  grad = jax.grad(loss)(jnp.asarray(logits, jnp.float32))
  expected = mask[..., None] * (jax.nn.softmax(logits, -1) - np.eye(7)[targets])
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_masking_equals_subset():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (3, 6)).astype(np.int32)
  mask = (rng.random((3, 6)) < 0.4).astype(np.float32)
  mask[0, 0] = 1.0
  logits[mask == 0] = np.nan  # unselected positions may hold anything
  _, metrics = mlm_loss(logits, targets, mask)
  keep = mask > 0
  _, subset = mlm_loss(logits[keep][None], targets[keep][None], np.ones((1, keep.sum())))
  for name in ("loss", "masked_accuracy"):
    np.testing.assert_allclose(metrics[name], subset[name], rtol=1e-6)


def test_limits():
  vocab, n = 13, 4
  targets = np.array([[3, 5, 7, 9]], np.int32)
  mask = np.ones((1, n), np.float32)
  # Uniform logits: loss log(vocab), the chance level.
  _, metrics = mlm_loss(np.zeros((1, n, vocab), np.float32), targets, mask)
  np.testing.assert_allclose(finalize_metrics(metrics)["loss"], math.log(vocab), rtol=1e-6)
  # Confident and right: loss -> 0, accuracy 1.
  perfect = 50.0 * np.eye(vocab, dtype=np.float32)[targets]
  final = finalize_metrics(mlm_loss(perfect, targets, mask)[1])
  assert float(final["loss"]) < 1e-12 and float(final["masked_accuracy"]) == 1.0
  # Nothing selected: zero weight, finalised to 0.
  final = finalize_metrics(mlm_loss(perfect, targets, 0 * mask)[1])
  assert float(final["loss"]) == 0.0

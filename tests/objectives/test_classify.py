"""Task losses and whole-set metrics: cross-entropy against hand values and PyTorch's weighted,
smoothed loss, masking equals the subset, gradients, MSE, and macro-F1 / Pearson / Spearman
against their definitions and scipy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
import torch
from jax.test_util import check_grads

from objectives.classify import (average_ranks, confusion_matrix, cross_entropy_loss,
                                 macro_f1, pearson, spearman, squared_error_loss)
from objectives.reductions import finalize_metrics

LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]],
                  np.float32)
LABELS = np.array([0, 0, 2, 1], np.int32)
MASK = np.ones(4, np.float32)


def test_hand_computed_cross_entropy_and_accuracy():
  per_example, metrics = cross_entropy_loss(LOGITS, LABELS, MASK)
  nll = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(LOGITS, LABELS)]
  np.testing.assert_allclose(per_example, nll, rtol=1e-5)
  got = finalize_metrics(metrics)
  np.testing.assert_allclose(got["loss"], np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(got["nll"], np.mean(nll), rtol=1e-5)
  # Right, wrong, right, and a tie between 0 and 1 that argmax gives to 0: wrong.
  assert float(got["accuracy"]) == 0.5


def test_weighted_smoothed_loss_equals_pytorch():
  weights = np.array([1.0, 3.0, 0.5], np.float32)
  for eps in (0.0, 0.1):
    _, metrics = cross_entropy_loss(LOGITS, LABELS, MASK, label_smoothing=eps,
                                    class_weights=weights)
    want = torch.nn.functional.cross_entropy(
        torch.tensor(LOGITS), torch.tensor(LABELS, dtype=torch.long),
        weight=torch.tensor(weights), label_smoothing=eps)
    np.testing.assert_allclose(finalize_metrics(metrics)["loss"], want.item(), rtol=1e-6)
    assert float(metrics["loss"][1]) == float(weights[LABELS].sum())


def test_masking_equals_the_subset_and_ignores_nan():
  logits = LOGITS.copy()
  logits[1] = np.nan
  mask = np.array([1, 0, 1, 1], np.float32)
  per_example, metrics = cross_entropy_loss(logits, LABELS, mask, label_smoothing=0.2)
  keep = mask > 0
  _, subset = cross_entropy_loss(LOGITS[keep], LABELS[keep], np.ones(3), label_smoothing=0.2)
  for k in metrics:
    np.testing.assert_allclose(metrics[k], subset[k], rtol=1e-6)
  assert float(per_example[1]) == 0.0


def test_same_under_jit_and_gradients():
  loss = lambda x: cross_entropy_loss(x, LABELS, MASK, label_smoothing=0.1)[1]["loss"][0]
  np.testing.assert_allclose(jax.jit(loss)(LOGITS), loss(LOGITS), rtol=1e-6)
  check_grads(loss, (jnp.asarray(LOGITS),), order=1, modes=("rev",), atol=1e-2)


def test_squared_error():
  predictions = np.array([[1.0], [2.5], [0.0]], np.float32)
  targets = np.array([1.5, 2.0, 4.0], np.float32)
  per_example, metrics = squared_error_loss(predictions, targets, np.array([1, 1, 0]))
  np.testing.assert_allclose(per_example, [0.25, 0.25, 0.0])
  got = finalize_metrics(metrics)
  assert float(got["mse"]) == float(got["loss"]) == 0.25 and float(got["mae"]) == 0.5


def test_confusion_matrix_adds_up_and_macro_f1():
  predictions = np.array([0, 1, 1, 2, 2, 0])
  labels = np.array([0, 1, 2, 2, 0, 0])
  whole = confusion_matrix(predictions, labels, np.ones(6), 3)
  halves = (confusion_matrix(predictions[:3], labels[:3], np.ones(3), 3)
            + confusion_matrix(predictions[3:], labels[3:], np.ones(3), 3))
  np.testing.assert_array_equal(whole, halves)
  # F1: class 0 TP 2 FP 0 FN 1 -> 4/5; class 1 TP 1 FP 1 FN 0 -> 2/3; class 2 TP 1 FP 1 FN 1
  # -> 1/2.
  np.testing.assert_allclose(macro_f1(whole), (4 / 5 + 2 / 3 + 1 / 2) / 3, rtol=1e-6)
  # A class neither present nor predicted is left out of the mean.
  np.testing.assert_allclose(macro_f1(confusion_matrix(predictions, labels, np.ones(6), 4)),
                             (4 / 5 + 2 / 3 + 1 / 2) / 3, rtol=1e-6)


def test_pearson_and_spearman_equal_scipy_with_ties_and_masks():
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=40), 1).astype(np.float32)   # rounded: ties
  y = (x + rng.normal(size=40)).astype(np.float32)
  y[::7] = 1.0
  np.testing.assert_allclose(pearson(x, y), scipy.stats.pearsonr(x, y)[0], rtol=1e-5)
  np.testing.assert_allclose(spearman(x, y), scipy.stats.spearmanr(x, y)[0], rtol=1e-5)
  np.testing.assert_allclose(average_ranks(x), scipy.stats.rankdata(x) - 1)
  mask = (rng.random(40) < 0.7).astype(np.float32)
  x_masked = np.where(mask > 0, x, np.nan)  # masked entries may hold anything
  keep = mask > 0
  np.testing.assert_allclose(spearman(x_masked, y, mask),
                             scipy.stats.spearmanr(x[keep], y[keep])[0], rtol=1e-5)
  np.testing.assert_allclose(pearson(x_masked, y, mask),
                             scipy.stats.pearsonr(x[keep], y[keep])[0], rtol=1e-5)
  assert float(pearson(np.ones(5), np.arange(5.0))) == 0.0   # a constant: no correlation

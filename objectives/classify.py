"""Task fine-tuning: cross-entropy over labels, squared error for regression, and the
whole-set metrics that are not means (macro-F1, Pearson, Spearman).

Classification over C labels, with label smoothing eps and class weights w (both optional),
exactly PyTorch's `CrossEntropyLoss(weight=w, label_smoothing=eps)` (mean reduction; with
eps = 0 and w = 1 the loss of `transformers`' `*ForSequenceClassification`):

    q_c      = (1 - eps) [c == y] + eps / C                (Szegedy et al., 2016, sec. 7)
    ce_i     = -sum_c w_c q_c log softmax(logits_i)_c
    loss     = sum_i mask_i ce_i / sum_i mask_i w_{y_i}

Regression (one output, HF's `problem_type="regression"`): loss = sum_i mask_i (pred_i -
y_i)^2 / sum_i mask_i (MSE).

Per-batch metrics are `(sum, weight)` pairs (objectives/reductions.py), exact over any split
of the data. Three figures of a task are not means of per-example values and need the whole
evaluation set at once:

    macro-F1  = mean_c 2 TP_c / (2 TP_c + FP_c + FN_c) from the confusion matrix, which *is*
                additive: batches' matrices sum to the set's (`confusion_matrix`, `macro_f1`);
    Pearson r = cov(x, y) / (sd(x) sd(y)) over the set (`pearson`);
    Spearman  = Pearson r of the ranks, ties given their average rank, as
                `scipy.stats.spearmanr` (`spearman`): ranks only exist over the whole set.

training/stages/classify.py gathers the held-out predictions and labels and applies these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from objectives.reductions import Metrics, weighted_sum


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                       label_smoothing: float = 0.0,
                       class_weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """Label-smoothed, class-weighted cross-entropy (see the module docstring).

  Args:
    logits: `[..., C]` any float dtype.
    labels: `[...]` int in [0, C) where `mask` > 0 (anything elsewhere).
    mask: `[...]`, 1 for a real example, 0 to ignore (ignored even if its logits are nan).
    label_smoothing: eps in [0, 1).
    class_weights: `[C]` weights w_c > 0, or None (all 1).

  Returns:
    per_example: `[...]` float32 ce_i, 0 where masked.
    metrics: `loss` (the weighted mean that is optimised: sum ce_i over weight sum w_{y_i});
      `nll` (-log p_y, unsmoothed, unweighted) and `accuracy` (argmax == y, ties to the
      lowest index), both weighted by the mask alone.
  """
  logits = logits.astype(jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  real = mask > 0
  labels = jnp.where(real, labels, 0).astype(jnp.int32)
  log_p = jnp.where(real[..., None], jax.nn.log_softmax(logits, axis=-1), 0.0)
  weights = (jnp.ones(logits.shape[-1], jnp.float32) if class_weights is None
             else jnp.asarray(class_weights, jnp.float32))
  nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  w_y = weights[labels]
  ce = ((1.0 - label_smoothing) * w_y * nll
        - label_smoothing * jnp.mean(weights * log_p, axis=-1))
  ce = jnp.where(real, ce, 0.0)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  metrics = {"loss": (jnp.sum(ce * mask), jnp.sum(w_y * mask)),
             "nll": weighted_sum(nll, mask), "accuracy": weighted_sum(correct, mask)}
  return ce, metrics


def squared_error_loss(predictions: jax.Array, targets: jax.Array,
                       mask: jax.Array) -> tuple[jax.Array, Metrics]:
  """Mean squared error for regression.

  Args:
    predictions: `[...]` (or `[..., 1]`, squeezed) float.
    targets: `[...]` float.
    mask: `[...]`, 1 for a real example.

  Returns:
    per_example: `[...]` float32 (pred - y)^2, 0 where masked.
    metrics: `loss` and `mse` (the same mean), `mae`, all weighted by the mask.
  """
  predictions = jnp.asarray(predictions, jnp.float32)
  if predictions.ndim == jnp.ndim(targets) + 1:
    predictions = predictions[..., 0]
  mask = jnp.asarray(mask, jnp.float32)
  error = predictions - jnp.asarray(targets, jnp.float32)
  squared = jnp.square(error)
  metrics = {"loss": weighted_sum(squared, mask), "mse": weighted_sum(squared, mask),
             "mae": weighted_sum(jnp.abs(error), mask)}
  return jnp.where(mask > 0, squared, 0.0), metrics


def confusion_matrix(predictions: jax.Array, labels: jax.Array, mask: jax.Array,
                     num_classes: int) -> jax.Array:
  """Counts `[C, C]` float32: entry (y, p) counts real examples of label y predicted p.

  Args:
    predictions: `[...]` int predicted classes.
    labels: `[...]` int true classes.
    mask: `[...]`, 1 for a real example (its weight).
  """
  mask = jnp.asarray(mask, jnp.float32).reshape(-1)
  index = (jnp.asarray(labels, jnp.int32).reshape(-1) * num_classes
           + jnp.asarray(predictions, jnp.int32).reshape(-1))
  index = jnp.where(mask > 0, index, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.float32).at[index].add(mask)
  return counts.reshape(num_classes, num_classes)


def macro_f1(confusion: jax.Array) -> jax.Array:
  """Mean over classes of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c) of a `[C, C]` confusion
  matrix (rows: labels, columns: predictions). A class that is neither present nor predicted
  has no F1 and is left out of the mean (scikit-learn would count it as 0 with a warning)."""
  confusion = jnp.asarray(confusion, jnp.float32)
  tp = jnp.diagonal(confusion)
  denominator = confusion.sum(0) + confusion.sum(1)  # (TP + FP) + (TP + FN)
  seen = denominator > 0
  f1 = jnp.where(seen, 2 * tp / jnp.maximum(denominator, 1e-30), 0.0)
  return jnp.sum(f1) / jnp.maximum(jnp.sum(seen), 1)


def pearson(x: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Pearson correlation of `x` and `y` (`[n]`) over the real entries (`mask` > 0; None:
  all); 0 when either is constant."""
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  y = jnp.asarray(y, jnp.float32).reshape(-1)
  w = jnp.ones_like(x) if mask is None else jnp.asarray(mask, jnp.float32).reshape(-1)
  x, y = jnp.where(w > 0, x, 0.0), jnp.where(w > 0, y, 0.0)  # masked entries may be inf
  total = jnp.maximum(jnp.sum(w), 1e-30)
  x = jnp.where(w > 0, x - jnp.sum(w * x) / total, 0.0)
  y = jnp.where(w > 0, y - jnp.sum(w * y) / total, 0.0)
  covariance = jnp.sum(w * x * y)
  scale = jnp.sqrt(jnp.sum(w * x * x) * jnp.sum(w * y * y))
  return jnp.where(scale > 0, covariance / jnp.maximum(scale, 1e-30), 0.0)


def average_ranks(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """0-based ranks of `x` (`[n]`) among its real entries, ties sharing their average rank
  (scipy's `rankdata(method="average") - 1`); masked entries get ranks above all real ones,
  which `pearson` then ignores."""
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  if mask is not None:
    x = jnp.where(jnp.asarray(mask).reshape(-1) > 0, x, jnp.inf)
  ordered = jnp.sort(x)
  below = jnp.searchsorted(ordered, x, side="left")       # entries smaller than x
  through = jnp.searchsorted(ordered, x, side="right")    # entries smaller or equal
  return (below + through - 1).astype(jnp.float32) / 2


def spearman(x: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Spearman rank correlation over the real entries: `pearson` of the average ranks."""
  return pearson(average_ranks(x, mask), average_ranks(y, mask), mask)

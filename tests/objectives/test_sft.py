"""SFT objective: token- and example-normalised masked cross-entropy on packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from objectives.clm import clm_loss
from objectives.reductions import finalize_metrics
from objectives.sft import example_weights, sft_loss

# One row of 6 tokens: segment 1 (3 tokens, 1 supervised), segment 2 (2 tokens, 2 supervised),
# one padding token. Vocabulary of 3.
LOGITS = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0],
                    [1.0, 1.0, 3.0], [0.5, -1.0, 0.0], [9.0, 9.0, 9.0]]], np.float32)
TARGETS = np.array([[0, 1, 2, 2, 1, 0]], np.int32)
MASK = np.array([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]], np.float32)
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0]], np.int32)


def _nll(logits, target):
  return float(np.log(np.exp(logits).sum()) - logits[target])


NLL = [_nll(LOGITS[0, t], TARGETS[0, t]) for t in range(6)]


def _final(metrics):
  return {k: float(v) for k, v in finalize_metrics(metrics).items()}


def test_hand_computed_token_and_example_losses():
  assert NLL[2] == pytest.approx(np.log(3.0))
  _, metrics = sft_loss(LOGITS, TARGETS, MASK, SEGMENTS, normalize="token")
  token = (NLL[2] + NLL[3] + NLL[4]) / 3
  assert _final(metrics)["loss"] == pytest.approx(token, rel=1e-6)
  assert float(metrics["loss"][1]) == 3.0
  per_token, metrics = sft_loss(LOGITS, TARGETS, MASK, SEGMENTS, normalize="example")
  example = (NLL[2] + (NLL[3] + NLL[4]) / 2) / 2
  assert _final(metrics)["loss"] == pytest.approx(example, rel=1e-6)
  assert float(metrics["loss"][1]) == pytest.approx(2.0)  # the weight counts examples
  assert _final(metrics)["nll"] == pytest.approx(token, rel=1e-6)  # still token-weighted
  np.testing.assert_allclose(per_token[0], [0, 0, NLL[2], NLL[3], NLL[4], 0], rtol=1e-6)


def test_token_normalisation_is_clm_loss():
  got = sft_loss(LOGITS, TARGETS, MASK, SEGMENTS, z_loss=1e-2)
  want = clm_loss(LOGITS, TARGETS, MASK, z_loss=1e-2)
  np.testing.assert_array_equal(got[0], want[0])
  jax.tree.map(np.testing.assert_array_equal, got[1], want[1])


def test_example_weights_sum_to_one_per_segment():
  mask = np.array([[1, 1, 0, 1, 0], [0.5, 0.5, 1, 0, 0]], np.float32)
  segments = np.array([[1, 1, 2, 3, 0], [1, 1, 1, 2, 0]], np.int32)
  np.testing.assert_allclose(example_weights(mask, segments),
                             [[0.5, 0.5, 0, 1, 0], [0.25, 0.25, 0.5, 0, 0]])


@pytest.mark.parametrize("normalize", ["token", "example"])
def test_same_under_jit(normalize):
  eager = sft_loss(LOGITS, TARGETS, MASK, SEGMENTS, normalize=normalize)
  jitted = jax.jit(lambda *a: sft_loss(*a, normalize=normalize))(LOGITS, TARGETS, MASK,
                                                                 SEGMENTS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def test_gradients_checked_and_analytic():
  loss = lambda logits: sft_loss(logits, TARGETS, MASK, SEGMENTS, normalize="example")[1][
      "loss"][0]
  check_grads(loss, (jnp.asarray(LOGITS),), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
  # d loss_sum / d logits_t = w_t (softmax_t - onehot_t), with w = (0, 0, 1, 1/2, 1/2, 0).
  grad = jax.grad(loss)(jnp.asarray(LOGITS))
  p = jax.nn.softmax(LOGITS, axis=-1)
  onehot = jax.nn.one_hot(TARGETS, 3)
  weights = np.array([0, 0, 1, 0.5, 0.5, 0])[None, :, None]
  np.testing.assert_allclose(grad, weights * (p - onehot), atol=1e-6)


def test_masking_equals_taking_the_subset():
  # Masking segment 1 out entirely gives the loss of segment 2 alone.
  mask = MASK.copy()
  mask[0, :3] = 0
  _, masked = sft_loss(LOGITS, TARGETS, mask, SEGMENTS, normalize="example")
  _, subset = sft_loss(LOGITS[:, 3:5], TARGETS[:, 3:5], MASK[:, 3:5], SEGMENTS[:, 3:5],
                       normalize="example")
  assert _final(masked)["loss"] == pytest.approx(_final(subset)["loss"], rel=1e-6)
  assert float(masked["loss"][1]) == float(subset["loss"][1]) == pytest.approx(1.0)


def test_rows_split_between_micro_batches_sum_exactly():
  # Example normalisation stays exact when rows are split across micro-batches / hosts.
  logits = np.concatenate([LOGITS, LOGITS[:, ::-1]])
  targets, mask, segs = (np.concatenate([x, x]) for x in (TARGETS, MASK, SEGMENTS))
  _, whole = sft_loss(logits, targets, mask, segs, normalize="example")
  parts = [sft_loss(logits[i:i + 1], targets[i:i + 1], mask[i:i + 1], segs[i:i + 1],
                    normalize="example")[1]["loss"] for i in range(2)]
  assert float(whole["loss"][0]) == pytest.approx(sum(float(p[0]) for p in parts), rel=1e-6)
  assert float(whole["loss"][1]) == pytest.approx(4.0)


def test_known_limits():
  # A batch with nothing supervised has weight 0 (the step's division guards it), and
  # infinite logits on masked tokens do not leak into the loss.
  logits = LOGITS.copy()
  logits[0, 5] = np.inf
  _, metrics = sft_loss(logits, TARGETS, np.zeros_like(MASK), SEGMENTS, normalize="example")
  assert float(metrics["loss"][0]) == 0.0 and float(metrics["loss"][1]) == 0.0
  _, metrics = sft_loss(logits, TARGETS, MASK, SEGMENTS, normalize="example")
  assert np.isfinite(float(metrics["loss"][0]))
  with pytest.raises(ValueError, match="normalize"):
    sft_loss(LOGITS, TARGETS, MASK, SEGMENTS, normalize="sequence")

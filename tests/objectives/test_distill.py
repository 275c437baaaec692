"""Distillation losses: hand-computed values, jit, gradients, masking = subset, limits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from objectives.distill import distill_loss, token_divergence
from objectives.reductions import finalize_metrics

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _kl(p, q):
  return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# Two-token vocabulary: teacher p = (1/2, 1/2), student q = (1/4, 3/4).
P, Q = (0.5, 0.5), (0.25, 0.75)
TEACHER = np.log(np.array([[P]], np.float32))
STUDENT = np.log(np.array([[Q]], np.float32))


def test_hand_computed_divergences():
  fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
  rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
  m = (0.5 * 0.5 + 0.5 * 0.25, 0.5 * 0.5 + 0.5 * 0.75)  # beta 0.5 mixture: (3/8, 5/8)
  jsd = 0.5 * _kl(P, m) + 0.5 * _kl(Q, m)
  m3 = (0.3 * 0.5 + 0.7 * 0.25, 0.3 * 0.5 + 0.7 * 0.75)
  jsd3 = 0.3 * _kl(P, m3) + 0.7 * _kl(Q, m3)
  got = lambda kind, **kw: float(token_divergence(STUDENT, TEACHER, divergence=kind, **kw)[0, 0])
  assert got("forward_kl") == pytest.approx(fkl, rel=1e-5)
  assert got("reverse_kl") == pytest.approx(rkl, rel=1e-5)
  assert got("jsd", beta=0.5) == pytest.approx(jsd, rel=1e-5)
  assert got("jsd", beta=0.3) == pytest.approx(jsd3, rel=1e-5)


def test_temperature_and_ce_mix_hand_computed():
  # Student logits (0, log 3) at T = 2: q = (1, sqrt 3) / (1 + sqrt 3); teacher uniform.
  student = np.array([[[0.0, math.log(3.0)]]], np.float32)
  teacher = np.zeros((1, 1, 2), np.float32)
  q = (1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3)))
  div = _kl(P, q)
  nll = -math.log(0.25)  # label 0 at T = 1: p_student(0) = 1 / 4
  targets, mask = np.array([[0]], np.int32), np.ones((1, 1), np.float32)
  per_token, metrics = distill_loss(student, teacher, targets, mask, temperature=2.0,
                                    ce_weight=0.25)
  # loss = (1 - ce_weight) * T^2 * D + ce_weight * nll
  assert float(per_token[0, 0]) == pytest.approx(0.75 * 4 * div + 0.25 * nll, rel=1e-5)
  final = finalize_metrics(metrics)
  assert float(final["divergence"]) == pytest.approx(div, rel=1e-5)
  assert float(final["nll"]) == pytest.approx(nll, rel=1e-5)
  assert float(final["teacher_nll"]) == pytest.approx(math.log(2), rel=1e-5)
  assert float(final["accuracy"]) == 0.0      # student argmax is 1, label 0
  assert float(final["agreement"]) == 0.0     # teacher argmax of the tie (0, 0) is 0
  # ce_weight 1: the loss is the label cross-entropy alone, as in plain CLM training.
  per_token, _ = distill_loss(student, teacher, targets, mask, temperature=2.0, ce_weight=1.0)
  assert float(per_token[0, 0]) == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_same_under_jit(kind):
  rng = np.random.default_rng(0)
  s, t = (rng.normal(size=(2, 3, 5)).astype(np.float32) for _ in range(2))
  targets = rng.integers(0, 5, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  fn = lambda s, t: distill_loss(s, t, targets, mask, divergence=kind, beta=0.3,
                                 temperature=1.5, ce_weight=0.2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               fn(s, t), jax.jit(fn)(s, t))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients(kind):
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32) for _ in range(2))
  targets = rng.integers(0, 5, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  loss = lambda s: distill_loss(s, t, targets, mask, divergence=kind, temperature=2.0,
                                ce_weight=0.3)[1]["loss"][0]
  check_grads(loss, (s,), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_forward_kl_gradient_is_analytic():
  # d/ds [T^2 KL(p || q)] = T (q - p), with p, q the softmaxes at temperature T.
  rng = np.random.default_rng(2)
  s, t = (rng.normal(size=(1, 4, 6)).astype(np.float32) for _ in range(2))
  temperature = 3.0
  grad = jax.grad(lambda s: distill_loss(s, t, np.zeros((1, 4), np.int32), np.ones((1, 4)),
                                         temperature=temperature)[1]["loss"][0])(s)
  q, p = jax.nn.softmax(s / temperature, -1), jax.nn.softmax(t / temperature, -1)
  np.testing.assert_allclose(grad, temperature * (q - p), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_masking_equals_subset(kind):
  rng = np.random.default_rng(3)
  s, t = (rng.normal(size=(3, 4, 7)).astype(np.float32) for _ in range(2))
  targets = rng.integers(0, 7, (3, 4)).astype(np.int32)
  mask = (rng.random((3, 4)) < 0.5).astype(np.float32)
  mask[0, 0] = 1.0
  s[mask == 0] = np.nan  # masked positions may hold anything
  kw = dict(divergence=kind, temperature=1.7, ce_weight=0.4)
  per_token, metrics = distill_loss(s, t, targets, mask, **kw)
  keep = mask > 0
  _, subset = distill_loss(s[keep][None], t[keep][None], targets[keep][None],
                           np.ones((1, keep.sum())), **kw)
  assert np.all(np.asarray(per_token)[~keep] == 0.0)
  for name in metrics:
    np.testing.assert_allclose(metrics[name], subset[name], rtol=1e-5)


def test_limits():
  rng = np.random.default_rng(4)
  s, t = (rng.normal(size=(2, 8)).astype(np.float32) for _ in range(2))
  # Identical distributions: every divergence is 0.
  for kind in KINDS:
    np.testing.assert_allclose(token_divergence(s, s, divergence=kind), 0.0, atol=1e-6)
  # Very high temperature flattens both to uniform: divergence -> 0.
  assert float(jnp.abs(token_divergence(s, t, temperature=1e3)).max()) < 1e-5
  fkl = token_divergence(s, t, divergence="forward_kl")
  rkl = token_divergence(s, t, divergence="reverse_kl")
  # JSD(beta) / beta -> KL(p || q) as beta -> 0; JSD(beta) / (1 - beta) -> KL(q || p) as
  # beta -> 1 (Agarwal et al., 2024).
  eps = 1e-4
  np.testing.assert_allclose(token_divergence(s, t, divergence="jsd", beta=eps) / eps, fkl,
                             rtol=2e-2)
  np.testing.assert_allclose(token_divergence(s, t, divergence="jsd", beta=1 - eps) / eps, rkl,
                             rtol=2e-2)
  # JSD(0.5) of disjoint distributions is log 2, its maximum.
  disjoint_s = np.array([[40.0, -40.0]], np.float32)
  disjoint_t = np.array([[-40.0, 40.0]], np.float32)
  assert float(token_divergence(disjoint_s, disjoint_t, divergence="jsd")[0]) == pytest.approx(
      math.log(2), rel=1e-5)
  # A one-hot teacher: forward KL is the student's cross-entropy on the teacher's token.
  onehot = np.array([[60.0, 0.0, 0.0]], np.float32)
  student = np.array([[0.3, 1.2, -0.5]], np.float32)
  expected = -jax.nn.log_softmax(student)[0, 0]
  np.testing.assert_allclose(token_divergence(student, onehot)[0], expected, rtol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="beta"):
    token_divergence(STUDENT, TEACHER, divergence="jsd", beta=0.0)
  with pytest.raises(ValueError, match="unknown"):
    token_divergence(STUDENT, TEACHER, divergence="kl")
  with pytest.raises(ValueError, match="temperature"):
    token_divergence(STUDENT, TEACHER, temperature=0.0)
  with pytest.raises(ValueError, match="same tokenizer"):
    token_divergence(np.zeros((1, 3)), np.zeros((1, 4)))
  with pytest.raises(ValueError, match="ce_weight"):
    distill_loss(STUDENT, TEACHER, np.zeros((1, 1), np.int32), np.ones((1, 1)), ce_weight=1.5)

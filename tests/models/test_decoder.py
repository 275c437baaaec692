"""Decoder: causality, packing, attention variants, scan / remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
from configs.models import model_config
from models.attention import dense_attention, segment_mask
from models.build import build_model_spec


def small_config(**overrides):
  cfg = model_config("tiny")
  cfg.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_length=32))
  cfg.update(overrides)
  return cfg


def forward(cfg, params, tokens, positions, segment_ids):
  spec = build_model_spec(cfg)
  return spec.bind(params)(jnp.asarray(tokens), positions=jnp.asarray(positions),
                           segment_ids=jnp.asarray(segment_ids))


def init(cfg, seed=0):
  return build_model_spec(cfg).init(jax.random.PRNGKey(seed))


STYLES = {
    "llama": {},
    "gpt2": dict(norm="layernorm", position="learned", activation="gelu", qkv_bias=True,
                 out_bias=True, mlp_bias=True, tie_embeddings=True, num_kv_heads=4),
    "qwen2": dict(qkv_bias=True, tie_embeddings=False, rope_theta=1e6),
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_causality(style):
  cfg = small_config(**STYLES[style])
  params = init(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (2, 12)).astype(np.int32)
  positions = np.tile(np.arange(12), (2, 1))
  seg = np.ones((2, 12), np.int32)
  base = forward(cfg, params, tokens, positions, seg)
  t = 7
  changed = tokens.copy()
  changed[:, t] = (changed[:, t] + 1) % 64
  out = forward(cfg, params, changed, positions, seg)
  np.testing.assert_array_equal(out[:, :t], base[:, :t])
  assert float(jnp.abs(out[:, t:] - base[:, t:]).max()) > 1e-4


@pytest.mark.parametrize("style", sorted(STYLES))
def test_packed_row_equals_segments_alone(style):
  cfg = small_config(**STYLES[style])
  params = init(cfg)
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, 64, 5), rng.integers(0, 64, 4)
  packed = np.concatenate([doc_a, doc_b, [0, 0, 0]])[None].astype(np.int32)
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]])
  out = forward(cfg, params, packed, positions, seg)
  alone_a = forward(cfg, params, doc_a[None], np.arange(5)[None], np.ones((1, 5), np.int32))
  alone_b = forward(cfg, params, doc_b[None], np.arange(4)[None], np.ones((1, 4), np.int32))
  np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:9], alone_b[0], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def naive_attention(q, k, v, mask, scale):
  q, k, v = map(np.asarray, (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  logits = np.einsum("blhd,bshd->bhls", q, k) * scale
  logits = np.where(mask[:, None], logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhls,bshd->blhd", probs, v)


def test_grouped_query_attention_matches_naive():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 16, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 16, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 16, 2, 8)).astype(np.float32)
  seg = np.array([[1] * 10 + [2] * 6, [1] * 16])
  mask = np.asarray(segment_mask(jnp.asarray(seg), jnp.asarray(seg), causal=True))
  expected = naive_attention(q, k, v, mask, 0.3)
  np.testing.assert_allclose(dense_attention(q, k, v, mask, 0.3), expected, atol=1e-5)


def test_sliding_window_mask_by_hand():
  seg = jnp.array([[1, 1, 1, 1, 2, 2]])
  mask = np.asarray(segment_mask(seg, seg, causal=True, window=2))[0].astype(int)
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                       [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                                       [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]])


def test_segment_mask_padding_attends_nowhere():
  seg = jnp.array([[1, 1, 2, 0]])
  mask = np.asarray(segment_mask(seg, seg, causal=True))[0]
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def _loss_and_grads(cfg, params, tokens):
  spec = build_model_spec(cfg)
  positions = jnp.tile(jnp.arange(tokens.shape[1]), (tokens.shape[0], 1))
  seg = jnp.ones_like(tokens)

  def loss(p):
    logits = spec.bind(p)(tokens, positions=positions, segment_ids=seg)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, jnp.roll(tokens, -1, 1)[..., None], -1)[..., 0])
  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_and_attention_impls_give_same_loss_and_grads():
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 16)), jnp.int32)
  base_cfg = small_config()
  params = init(base_cfg)
  ref_loss, ref_grads = _loss_and_grads(base_cfg, params, tokens)
  for overrides in (dict(remat="full"), dict(remat="save_dots"),
                    dict(attention="blockwise", attention_block=4)):
    loss, grads = _loss_and_grads(small_config(**overrides), params, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_scanned_equals_unrolled_layers():
  tokens = np.random.default_rng(4).integers(0, 64, (2, 10)).astype(np.int32)
  positions, seg = np.tile(np.arange(10), (2, 1)), np.ones((2, 10), np.int32)
  scanned_cfg = small_config()
  params = init(scanned_cfg)
  unrolled_cfg = small_config(scan_layers=False)
  stacked = params["blocks"]["layers"]
  layers = {i: jax.tree.map(lambda x: x[i], stacked) for i in range(scanned_cfg.num_layers)}
  unrolled = dict(params, blocks={"layers": layers})
  expected = forward(scanned_cfg, params, tokens, positions, seg)
  got = forward(unrolled_cfg, unrolled, tokens, positions, seg)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_logical_axes_cover_every_param():
  for style in STYLES.values():
    spec = build_model_spec(small_config(**style))
    flat_axes = jax.tree_util.tree_leaves(spec.logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree_util.tree_leaves(spec.shapes)
    assert len(flat_axes) == len(flat_shapes)
    for axes, shape in zip(flat_axes, flat_shapes):
      assert len(axes) == len(shape.shape) and None not in axes

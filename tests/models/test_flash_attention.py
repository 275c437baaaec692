"""models/flash_attention.py against the dense reference: values and gradients (custom VJP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import dense_attention, segment_mask
from models.flash_attention import MAX_BLOCKS, _blocks, flash_attention

# Two packed rows: three segments then padding; one full segment. 13 tokens: uneven blocks.
SEGMENTS = np.array([[1] * 5 + [2] * 3 + [3] * 3 + [0] * 2, [1] * 13], np.int32)


def _inputs(heads, kv_heads, seed=0):
  rng = np.random.default_rng(seed)
  b, length, d = SEGMENTS.shape[0], SEGMENTS.shape[1], 8
  q = rng.normal(size=(b, length, heads, d)).astype(np.float32)
  k = rng.normal(size=(b, length, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=(b, length, kv_heads, d)).astype(np.float32)
  cot = rng.normal(size=(b, length, heads, d)).astype(np.float32)
  return q, k, v, cot


def _real(x):
  """Padding queries' outputs are unspecified (the caller zeroes them): compare the rest."""
  return x * (SEGMENTS > 0)[:, :, None, None]


@pytest.mark.parametrize("causal,block,window", [(True, 4, 0), (True, 5, 0), (True, 0, 0),
                                                 (False, 4, 0), (True, 4, 3)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_values_and_gradients_equal_dense(causal, block, window, heads, kv_heads):
  q, k, v, cot = _inputs(heads, kv_heads)
  seg = jnp.asarray(SEGMENTS)
  mask = segment_mask(seg, seg, causal=causal, window=window)
  dense = lambda q, k, v: _real(dense_attention(q, k, v, mask, 0.35))
  flash = lambda q, k, v: _real(flash_attention(q, k, v, seg, 0.35, causal=causal,
                                                block=block, window=window))
  want, want_vjp = jax.vjp(dense, q, k, v)
  got, got_vjp = jax.vjp(jax.jit(flash), q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-6)
  for g, w in zip(got_vjp(jnp.asarray(cot)), want_vjp(jnp.asarray(cot))):
    np.testing.assert_allclose(g, w, atol=2e-5)


def test_gradient_of_padding_and_other_segments_is_zero():
  """A query's loss reaches only the keys of its own segment at or before it."""
  q, k, v, _ = _inputs(2, 2, seed=1)
  seg = jnp.asarray(SEGMENTS)
  loss = lambda k: flash_attention(q, k, v, seg, 0.35, causal=True, block=4)[0, 6].sum()
  grad = np.asarray(jax.grad(loss)(k))[0]  # query 6 is in segment 2 (tokens 5..7)
  assert np.abs(grad[5:7]).sum() > 0
  np.testing.assert_array_equal(grad[:5], 0.0)
  np.testing.assert_array_equal(grad[7:], 0.0)


def test_blocks_cover_the_row_and_stay_few():
  assert _blocks(13, 4, causal=True) == [(0, 4, 4), (4, 8, 8), (8, 12, 12), (12, 13, 13)]
  assert _blocks(13, 4, causal=False) == [(0, 13, 13)]
  assert _blocks(13, 0, causal=True) == [(0, 13, 13)]
  long = _blocks(8192, 128, causal=True)
  assert len(long) == MAX_BLOCKS and long[0] == (0, 512, 512) and long[-1][1] == 8192


def test_bfloat16_inputs_keep_their_dtype_and_track_float32():
  q, k, v, _ = _inputs(4, 2, seed=2)
  seg = jnp.asarray(SEGMENTS)
  f32 = flash_attention(q, k, v, seg, 0.35, causal=True, block=4)
  bf16 = flash_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), seg, 0.35,
                         causal=True, block=4)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(_real(bf16.astype(jnp.float32)), _real(f32), atol=3e-2)

"""models/flash_attention.py against the dense reference: values and gradients (custom VJP),
and the key blocks it computes (`block_schedule`): causal, window and segment skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import dense_attention, segment_mask
from models.flash_attention import MAX_BLOCKS, block_schedule, flash_attention, plan_blocks

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


def _ranges(plan):
  """(q_start, q_stop, first key tile, last key tile) of each query block."""
  return [(b.q_start, b.q_stop, b.first, b.last) for b in plan]


def test_blocks_cover_the_row_and_stay_few():
  assert _ranges(plan_blocks(13, 4, causal=True)) == [(0, 4, 0, 0), (4, 8, 0, 1),
                                                      (8, 12, 0, 2), (12, 13, 0, 3)]
  # Bidirectional rows: one block without skipping, tiles of the same grid with it.
  assert _ranges(plan_blocks(13, 4, causal=False, skip=False)) == [(0, 13, 0, 0)]
  assert _ranges(plan_blocks(13, 4, causal=False))[1] == (4, 8, 0, 3)
  assert _ranges(plan_blocks(13, 0, causal=True)) == [(0, 13, 0, 0)]
  long = plan_blocks(8192, 128, causal=True)
  assert len(long) == MAX_BLOCKS and _ranges(long)[0] == (0, 512, 0, 0)
  assert _ranges(long)[-1] == (7680, 8192, 0, 15)
  # A window of 6 tokens: query block [12, 16) never meets key tile [0, 4).
  assert _ranges(plan_blocks(32, 4, causal=True, window=6))[3] == (12, 16, 1, 3)


# A DPO-style batch: every row one pair, chosen then rejected, back to back (the second row's
# pair shorter, then padding).
PAIRS = np.array([[1] * 16 + [2] * 16, [1] * 16 + [2] * 12 + [0] * 4], np.int32)


def _keys_computed(schedule):
  return sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in schedule)


def test_schedule_skips_key_tiles_of_other_documents():
  got = block_schedule(PAIRS, causal=True, block=4)
  # Chosen queries (blocks 0..3) see keys from 0, rejected ones (blocks 4..7) from 16.
  assert got == [(s, s + 4, 0 if s < 16 else 16, s + 4) for s in range(0, 32, 4)]
  old = block_schedule(PAIRS, causal=True, block=4, skip=False)
  assert old == [(s, s + 4, 0, s + 4) for s in range(0, 32, 4)]
  assert (_keys_computed(got), _keys_computed(old)) == (4 * 80, 4 * 144)


def test_schedule_is_the_union_over_rows_and_shrinks_padding_blocks():
  # Row 1's chosen side ends inside key block 1: rejected queries of block 2 need it.
  rows = np.array([[1] * 8 + [2] * 8, [1] * 6 + [2] * 6 + [0] * 4], np.int32)
  assert block_schedule(rows, causal=True, block=4)[2] == (8, 12, 4, 12)
  padded = np.array([[1] * 10 + [0] * 6] * 2, np.int32)
  assert block_schedule(padded, causal=True, block=4)[3] == (12, 16, 12, 16)
  # Bidirectional: chosen-only queries [0, 4) see keys [0, 8), rejected-only [12, 16) keys
  # [8, 16).
  bidirectional = block_schedule(rows, causal=False, block=4)
  assert (bidirectional[0], bidirectional[3]) == ((0, 4, 0, 8), (12, 16, 8, 16))


@pytest.mark.parametrize("causal,window", [(True, 0), (False, 0), (True, 6)])
def test_skipping_equals_dense_on_pairs(causal, window):
  """Values and gradients where blocks are actually skipped (both rows packed)."""
  rng = np.random.default_rng(3)
  b, length, heads, kv_heads, d = 2, 32, 4, 2, 8
  q, cot = (rng.normal(size=(b, length, heads, d)).astype(np.float32) for _ in range(2))
  k, v = (rng.normal(size=(b, length, kv_heads, d)).astype(np.float32) for _ in range(2))
  seg = jnp.asarray(PAIRS)
  real = lambda x: x * (PAIRS > 0)[:, :, None, None]
  mask = segment_mask(seg, seg, causal=causal, window=window)
  dense = lambda q, k, v: real(dense_attention(q, k, v, mask, 0.35))
  flash = lambda q, k, v: real(flash_attention(q, k, v, seg, 0.35, causal=causal, block=4,
                                               window=window))
  want, want_vjp = jax.vjp(dense, q, k, v)
  got, got_vjp = jax.vjp(jax.jit(flash), q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-6)
  for g, w in zip(got_vjp(jnp.asarray(cot)), want_vjp(jnp.asarray(cot))):
    np.testing.assert_allclose(g, w, atol=2e-5)


def test_bfloat16_inputs_keep_their_dtype_and_track_float32():
  q, k, v, _ = _inputs(4, 2, seed=2)
  seg = jnp.asarray(SEGMENTS)
  f32 = flash_attention(q, k, v, seg, 0.35, causal=True, block=4)
  bf16 = flash_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), seg, 0.35,
                         causal=True, block=4)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(_real(bf16.astype(jnp.float32)), _real(f32), atol=3e-2)

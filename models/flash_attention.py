"""Memory-lean softmax attention over packed rows, in plain JAX (FlashAttention-style).

Queries are processed in blocks of `block` rows; with a causal mask, query block i only meets
keys before the end of block i, so about half of the `[q, k]` square is never computed. The
mask is never materialised at `[batch, heads, q, k]`: each block rebuilds it from the segment
ids (and an iota when causal), which XLA fuses into the softmax loop. The backward pass (a
custom VJP) recomputes the probabilities from the saved log-sum-exp instead of keeping them
(Dao et al., 2022, FlashAttention, sec. 3.1), so a layer saves only q, k, v, its output and
one float per query and head for the backward pass.

Why this shape on XLA:CPU (README, "Benchmarks", has the `bench` model's figures): the
generic path (`attention.dense_attention`) runs far below the matmul rate because every
`[batch, heads, q, k]` intermediate (the broadcast mask, the where, the probabilities kept for
the backward pass) is a round trip through freshly allocated memory; here the per-block
intermediates are the only big arrays, the probabilities are normalised after the PV matmul
(one pass fewer), and the heads are laid out `[batch, kv_heads, group * q, head_dim]` so every
contraction is a plain batched GEMM.

Layout inside: q `[batch, kv_heads, groups, length, head_dim]`, k and v
`[batch, kv_heads, length, head_dim]`; `flash_attention` converts from and to the model's
`[batch, length, heads, head_dim]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The logit of a masked pair, for every attention path (dense, blockwise, KV cache): finite, so
# a fully masked (padding) row stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_F32 = jnp.float32


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array, *, causal: bool,
                 window: int = 0) -> jax.Array:
  """Boolean mask `[batch, q_len, kv_len]`: same non-zero segment, and key index <= query index
  when causal (query i of a length-L row is key slot i); with `window` > 0 also key index >
  query index - window (sliding-window attention, causal only)."""
  mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments[:, :, None] > 0)
  if causal:
    q_len, kv_len = q_segments.shape[1], kv_segments.shape[1]
    q_index = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_index = jnp.arange(kv_len)[None, :]
    keep = k_index <= q_index
    if window > 0:
      keep = keep & (k_index > q_index - window)
    mask = mask & keep[None]
  return mask


def _block_mask(segment_ids: jax.Array, q_start: int, q_stop: int, kv_stop: int,
                causal: bool, window: int) -> jax.Array:
  """`[batch, q_stop - q_start, kv_stop]` bool mask of query block [q_start, q_stop) over keys
  [0, kv_stop) (a causal block ends where its keys end: kv_stop == q_stop)."""
  return segment_mask(segment_ids[:, q_start:q_stop], segment_ids[:, :kv_stop], causal=causal,
                      window=window)


# At most this many query blocks per row: each block is its own ops in the program (the block
# loop is unrolled so that block i sees only keys [0, end of block i)), so at long lengths the
# block grows instead (Llama-3-8B at 8192 tokens: 16 blocks of 512, not 64 of 128; the TPU
# compile takes half the time).
MAX_BLOCKS = 16


def _blocks(length: int, block: int, causal: bool):
  """(q_start, q_stop, kv_stop) per query block; non-causal rows are one block over all keys."""
  if not causal or block <= 0 or block >= length:
    return [(0, length, length)]
  block = max(block, -(-length // MAX_BLOCKS))
  return [(s, min(s + block, length), min(s + block, length) if causal else length)
          for s in range(0, length, block)]


def _logits(q, k, mask, scale):
  s = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=_F32) * scale
  return jnp.where(mask[:, None, None], s, MASK_VALUE)


def _forward(q, k, v, segment_ids, scale, causal, block, window):
  outs, lses = [], []
  for q_start, q_stop, kv_stop in _blocks(q.shape[3], block, causal):
    mask = _block_mask(segment_ids, q_start, q_stop, kv_stop, causal, window)
    s = _logits(q[:, :, :, q_start:q_stop], k[:, :, :kv_stop], mask, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # Normalise after the PV product: a [q, head_dim] divide instead of a [q, k] one.
    o = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v[:, :, :kv_stop],
                   preferred_element_type=_F32) / denom
    outs.append(o.astype(q.dtype))
    lses.append((m + jnp.log(denom))[..., 0])
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=3)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, segment_ids, scale, causal, block, window):
  return _forward(q, k, v, segment_ids, scale, causal, block, window)[0]


def _attention_fwd(q, k, v, segment_ids, scale, causal, block, window):
  out, lse = _forward(q, k, v, segment_ids, scale, causal, block, window)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(scale, causal, block, window, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  # delta_i = sum_j p_ij dp_ij = <d_out_i, out_i>: the softmax backward's row term.
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)
  dq_blocks = []
  # dK and dV are accumulated transposed, [batch, kv_heads, head_dim, length]: each block's
  # dK^T = Q^T dS and dV^T = dO^T P keep the [q, k] block as the right-hand operand in its own
  # layout (a plain GEMM); only the small [q, head_dim] operands are transposed. The
  # optimization barriers stop XLA from folding those transposes back into the dots as a
  # transposed left operand, a form XLA:CPU's fast GEMM path does not take.
  dkt = jnp.zeros(k.shape[:2] + k.shape[3:] + k.shape[2:3], _F32)
  dvt = jnp.zeros(dkt.shape, _F32)
  qt = jax.lax.optimization_barrier(jnp.swapaxes(q, -1, -2))
  d_out_t = jax.lax.optimization_barrier(jnp.swapaxes(d_out, -1, -2))
  for q_start, q_stop, kv_stop in _blocks(q.shape[3], block, causal):
    mask = _block_mask(segment_ids, q_start, q_stop, kv_stop, causal, window)
    q_blk, d_out_blk = q[:, :, :, q_start:q_stop], d_out[:, :, :, q_start:q_stop]
    k_blk, v_blk = k[:, :, :kv_stop], v[:, :, :kv_stop]
    s = _logits(q_blk, k_blk, mask, scale)
    # Masked logits are MASK_VALUE, so exp is exactly 0 there; a padding row (all masked)
    # gets the forward's uniform weights back. No second select over the block.
    p = jnp.exp(s - lse[..., q_start:q_stop, None])
    dp = jnp.einsum("bkgqd,bksd->bkgqs", d_out_blk, v_blk, preferred_element_type=_F32)
    ds = p * (dp - delta[..., q_start:q_stop, None]) * scale
    dq_blocks.append(jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(k.dtype), k_blk,
                                preferred_element_type=_F32))
    dkt_blk = jnp.einsum("bkgdq,bkgqs->bkds", qt[..., q_start:q_stop], ds.astype(q.dtype),
                         preferred_element_type=_F32)
    dvt_blk = jnp.einsum("bkgdq,bkgqs->bkds", d_out_t[..., q_start:q_stop],
                         p.astype(d_out.dtype), preferred_element_type=_F32)
    if kv_stop == k.shape[2]:
      dkt, dvt = dkt + dkt_blk, dvt + dvt_blk
    else:
      dkt = dkt.at[..., :kv_stop].add(dkt_blk)
      dvt = dvt.at[..., :kv_stop].add(dvt_blk)
  dkt, dvt = jax.lax.optimization_barrier((dkt, dvt))
  dk, dv = jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)
  dq = dq_blocks[0] if len(dq_blocks) == 1 else jnp.concatenate(dq_blocks, axis=3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    scale: float, *, causal: bool, block: int, window: int = 0) -> jax.Array:
  """Softmax attention within segments, blockwise over queries, with a recomputing backward.

  Same result as `attention.dense_attention(q, k, v, segment_mask(...), scale)` on every
  non-padding query (padding queries, segment 0, attend nowhere; their output is unspecified
  and zeroed by the caller).

  Args:
    q: `[batch, length, heads, head_dim]`.
    k, v: `[batch, length, kv_heads, head_dim]`; heads is a multiple of kv_heads.
    segment_ids: `[batch, length]` int, 0 = padding.
    scale: multiplier of the logits (1/sqrt(head_dim)).
    causal: attend to keys at or before the query only.
    block: query rows per block when causal (<= 0 or >= length: one block).
    window: sliding window when causal: a query attends to its last `window` tokens (itself
      included); 0: no window.
  Returns:
    `[batch, length, heads, head_dim]` in q's dtype.
  """
  b, length, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, length, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = _attention(q, k, v, segment_ids, float(scale), bool(causal), int(block), int(window))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, d)

"""Memory-lean softmax attention over packed rows, in plain JAX (FlashAttention-style).

Queries are processed in blocks of `block` rows (unrolled: at most MAX_BLOCKS of them), keys in
tiles of the same grid. Each query block loops over a contiguous range of key tiles with an
online softmax (a running max, sum and output; Dao et al., 2022, FlashAttention, alg. 1), and
the range holds only the tiles some query of the block can see:

  - statically, by the causal mask and the sliding window: query block i never meets key tiles
    after i (about half the square), nor tiles wholly before its first query's window;
  - dynamically, by the segment ids (data, so decided at run time): a tile is needed when some
    row of the batch has a document in both the query block and the tile, judged from each
    block's smallest and largest non-padding segment id per row (two blocks whose id ranges do
    not overlap in any row share no document; conservative for any layout). A DPO row (chosen,
    then rejected) thus never computes rejected queries against chosen keys, and a query block
    of padding only computes one tile.

The loop bounds are traced (`lax.fori_loop` becomes a while loop), so one compiled tile body
serves every range. On XLA:CPU this is also faster than computing a query block's whole key
range as one wide block, even with nothing to skip: 128-key tiles keep the logits in cache.
`block_schedule` returns the key range each query block computes for a batch (tests count it).

The mask is never materialised at `[batch, heads, q, k]`: each tile rebuilds it from the segment
ids (and iotas when causal), which XLA fuses into the softmax. The backward pass (a custom VJP)
recomputes the probabilities from the saved log-sum-exp instead of keeping them (ibid., sec.
3.1), over the same tiles, so a layer saves only q, k, v, its output and one float per query and
head.

Why this shape on XLA:CPU: the generic path (`attention.dense_attention`) runs far below the
matmul rate because every `[batch, heads, q, k]` intermediate is a round trip through freshly
allocated memory; here the per-tile intermediates are the only big arrays, the probabilities are
normalised after the PV matmul (one pass fewer), and the heads are laid out
`[batch, kv_heads, group * q, head_dim]` so every contraction is a plain batched GEMM.

Layout inside: q `[batch, kv_heads, groups, length, head_dim]`, k and v
`[batch, kv_heads, length, head_dim]`; `flash_attention` converts from and to the model's
`[batch, length, heads, head_dim]`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

# The logit of a masked pair, for every attention path (dense, blockwise, KV cache): finite, so
# a fully masked (padding) row stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_F32 = jnp.float32
# At most this many query blocks per row: each block is its own loop in the program (unrolled,
# each with its own static causal bound), so at long lengths the block grows instead
# (Llama-3-8B at 8192 tokens: 16 blocks of 512, not 64 of 128).
MAX_BLOCKS = 16


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array, *, causal: bool,
                 window: int = 0) -> jax.Array:
  """Boolean mask `[batch, q_len, kv_len]`: same non-zero segment, and key index <= query index
  when causal (query i of a length-L row is key slot i); with `window` > 0 also key index >
  query index - window (sliding-window attention, causal only)."""
  q_len, kv_len = q_segments.shape[1], kv_segments.shape[1]
  return _tile_mask(q_segments, kv_segments, kv_len - q_len, 0, causal, window)


def _tile_mask(q_segments, kv_segments, q_start, k_start, causal: bool, window: int):
  """`segment_mask` of queries at row slots `q_start + i` over keys at `k_start + j` (either
  start may be traced)."""
  mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments[:, :, None] > 0)
  if causal:
    q_index = jnp.arange(q_segments.shape[1])[:, None] + q_start
    k_index = jnp.arange(kv_segments.shape[1])[None, :] + k_start
    keep = k_index <= q_index
    if window > 0:
      keep = keep & (k_index > q_index - window)
    mask = mask & keep[None]
  return mask


@dataclasses.dataclass(frozen=True)
class QueryBlock:
  """One query block's static plan: queries [q_start, q_stop) and the key tiles
  [first, last] the causal mask and window may let it see."""
  q_start: int
  q_stop: int
  first: int
  last: int


def _grid(length: int, block: int, causal: bool, skip: bool) -> int:
  """Rows per block and tile: `block`, grown to length / MAX_BLOCKS; the whole row when
  blocking cannot help (one block, or bidirectional rows without skipping)."""
  if block <= 0 or block >= length or (not causal and not skip):
    return length
  return max(block, -(-length // MAX_BLOCKS))


def plan_blocks(length: int, block: int, *, causal: bool, window: int = 0,
                skip: bool = True) -> list[QueryBlock]:
  """Static plan of a row of `length` tokens (see the module docstring).

  Args:
    length: tokens per row.
    block: rows per query block and key tile, grown to length / MAX_BLOCKS (<= 0: one).
    causal: query i sees keys <= i.
    window: sliding window (causal only): query i sees keys > i - window.
    skip: drop the tiles wholly outside the window (and, at run time, those the segment ids
      exclude); False: causal blocks meet every tile up to their own, as without skipping.
  """
  size = _grid(length, block, causal, skip)
  starts = list(range(0, length, size))
  plan = []
  for i, q_start in enumerate(starts):
    last = i if causal else len(starts) - 1
    first = 0
    if causal and window > 0 and skip:
      # Tile j is needed when its last key is inside the block's first query's window.
      first = next(j for j in range(last + 1) if (j + 1) * size - 1 > q_start - window)
    plan.append(QueryBlock(q_start, min(q_start + size, length), first, last))
  return plan


def _tile_ranges(segment_ids: jax.Array, plan: list[QueryBlock], skip: bool):
  """Per query block, the key tiles [lo, hi) it computes: int32 `[num_blocks]` each.

  Tiles i (queries) and j (keys) can share a document only if, in some row, the ranges of their
  non-padding segment ids overlap. A block of padding only gets one tile (its last
  candidate), so its softmax stays finite.
  """
  n = len(plan)
  if not skip:
    return (np.array([qb.first for qb in plan], np.int32),
            np.array([qb.last + 1 for qb in plan], np.int32))
  size = plan[0].q_stop - plan[0].q_start
  b, length = segment_ids.shape
  seg = jnp.pad(segment_ids, ((0, 0), (0, n * size - length))).reshape(b, n, size)
  real = seg > 0
  lo = jnp.min(jnp.where(real, seg, jnp.iinfo(seg.dtype).max), axis=-1)  # [b, n]
  hi = jnp.max(jnp.where(real, seg, -1), axis=-1)
  shared = jnp.any((lo[:, None, :] <= hi[:, :, None]) & (hi[:, None, :] >= lo[:, :, None]),
                   axis=0)  # [query block, key tile]
  allowed = np.zeros((n, n), bool)
  for i, qb in enumerate(plan):
    allowed[i, qb.first:qb.last + 1] = True
  needed = shared & allowed
  any_needed = jnp.any(needed, axis=1)
  lasts = np.array([qb.last for qb in plan], np.int32)
  first = jnp.where(any_needed, jnp.argmax(needed, axis=1), lasts)
  last = jnp.where(any_needed, n - 1 - jnp.argmax(needed[:, ::-1], axis=1), lasts)
  return first.astype(jnp.int32), (last + 1).astype(jnp.int32)


def block_schedule(segment_ids, *, causal: bool, block: int, window: int = 0,
                   skip: bool = True) -> list[tuple[int, int, int, int]]:
  """The key ranges the kernel computes for a concrete `segment_ids [batch, length]`: one
  `(q_start, q_stop, k_start, k_stop)` per query block."""
  length = segment_ids.shape[1]
  plan = plan_blocks(length, block, causal=causal, window=window, skip=skip)
  size = plan[0].q_stop - plan[0].q_start
  lo, hi = (np.asarray(x) for x in _tile_ranges(jnp.asarray(segment_ids), plan, skip))
  return [(qb.q_start, qb.q_stop, int(lo[i]) * size, min(int(hi[i]) * size, length))
          for i, qb in enumerate(plan)]


def _logits(q, k, mask, scale, softcap=0.0):
  s = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=_F32) * scale
  if softcap:  # Gemma 2: c * tanh(s / c)
    s = softcap * jnp.tanh(s / softcap)
  return jnp.where(mask[:, None, None], s, MASK_VALUE)


def _padded(x, axis: int, length: int):
  """`x` padded with zeros (segment id 0: padding) to `length` along `axis`, so that every
  tile, the last one too, is a whole tile."""
  if x.shape[axis] == length:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pads)


class _Tiles:
  """The key tiles of one call: k, v `[batch, kv_heads, n * size, head_dim]` and their segment
  ids, padded to whole tiles."""

  def __init__(self, k, v, segment_ids, size: int, n: int):
    self.size = size
    self.k, self.v = _padded(k, 2, n * size), _padded(v, 2, n * size)
    self.segment_ids = _padded(segment_ids, 1, n * size)

  def __call__(self, j):
    """(start, k, v, segment ids) of tile j (traced)."""
    start = j * self.size
    take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, self.size, axis=axis)
    return start, take(self.k, 2), take(self.v, 2), take(self.segment_ids, 1)


def _forward(q, k, v, segment_ids, scale, causal, block, window, skip, softcap):
  plan = plan_blocks(q.shape[3], block, causal=causal, window=window, skip=skip)
  tiles = _Tiles(k, v, segment_ids, plan[0].q_stop - plan[0].q_start, len(plan))
  lo, hi = _tile_ranges(segment_ids, plan, skip)
  outs, lses = [], []
  for i, qb in enumerate(plan):
    q_blk = q[:, :, :, qb.q_start:qb.q_stop]
    q_seg = segment_ids[:, qb.q_start:qb.q_stop]

    def tile(j, carry, q_blk=q_blk, q_seg=q_seg, q_start=qb.q_start):
      m, denom, acc = carry
      start, k_t, v_t, kv_seg = tiles(j)
      s = _logits(q_blk, k_t, _tile_mask(q_seg, kv_seg, q_start, start, causal, window),
                  scale, softcap)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
      # A fully masked tile before a row's first real key adds exp(0) weights to a row whose
      # max is MASK_VALUE; the first real key makes alpha 0 and drops them.
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new)
      acc = acc * alpha + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_t,
                                     preferred_element_type=_F32)
      return m_new, denom * alpha + jnp.sum(p, axis=-1, keepdims=True), acc

    stats = jnp.full(q_blk.shape[:-1] + (1,), MASK_VALUE, _F32)
    m, denom, acc = jax.lax.fori_loop(lo[i], hi[i], tile,
                                      (stats, jnp.zeros_like(stats), jnp.zeros(q_blk.shape, _F32)))
    # Normalise after the PV products: a [q, head_dim] divide instead of a [q, k] one.
    outs.append((acc / denom).astype(q.dtype))
    lses.append((m + jnp.log(denom))[..., 0])
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=3)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _attention(q, k, v, segment_ids, scale, causal, block, window, skip, softcap):
  return _forward(q, k, v, segment_ids, scale, causal, block, window, skip, softcap)[0]


def _attention_fwd(q, k, v, segment_ids, scale, causal, block, window, skip, softcap):
  out, lse = _forward(q, k, v, segment_ids, scale, causal, block, window, skip, softcap)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(scale, causal, block, window, skip, softcap, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  plan = plan_blocks(q.shape[3], block, causal=causal, window=window, skip=skip)
  size, n = plan[0].q_stop - plan[0].q_start, len(plan)
  tiles = _Tiles(k, v, segment_ids, size, n)
  lo, hi = _tile_ranges(segment_ids, plan, skip)
  # delta_i = sum_j p_ij dp_ij = <d_out_i, out_i>: the softmax backward's row term.
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)
  dq_blocks = []
  # dK and dV are accumulated transposed, [batch, kv_heads, head_dim, length]: each tile's
  # dK^T = Q^T dS and dV^T = dO^T P keep the [q, k] tile as the right-hand operand in its own
  # layout (a plain GEMM); only the small [q, head_dim] operands are transposed. The
  # optimization barriers stop XLA from folding those transposes back into the dots as a
  # transposed left operand, a form XLA:CPU's fast GEMM path does not take. The loops update
  # the accumulators in place, one tile at a time.
  dkt = jnp.zeros(k.shape[:2] + k.shape[3:] + (n * size,), _F32)
  dvt = jnp.zeros(dkt.shape, _F32)
  qt = jax.lax.optimization_barrier(jnp.swapaxes(q, -1, -2))
  d_out_t = jax.lax.optimization_barrier(jnp.swapaxes(d_out, -1, -2))
  for i, qb in enumerate(plan):
    sl = slice(qb.q_start, qb.q_stop)
    blk = dict(q=q[:, :, :, sl], qt=qt[..., sl], d_out=d_out[:, :, :, sl],
               d_out_t=d_out_t[..., sl], lse=lse[..., sl, None], delta=delta[..., sl, None],
               seg=segment_ids[:, sl])

    def tile(j, carry, blk=blk, q_start=qb.q_start):
      dq, dkt, dvt = carry
      start, k_t, v_t, kv_seg = tiles(j)
      s = _logits(blk["q"], k_t, _tile_mask(blk["seg"], kv_seg, q_start, start, causal, window),
                  scale, softcap)
      # Masked logits are MASK_VALUE, so exp is exactly 0 there; a padding row (all masked)
      # gets the forward's uniform weights back. No second select over the tile.
      p = jnp.exp(s - blk["lse"])
      dp = jnp.einsum("bkgqd,bksd->bkgqs", blk["d_out"], v_t, preferred_element_type=_F32)
      ds = p * (dp - blk["delta"]) * scale
      if softcap:
        # d/dx c tanh(x / c) = 1 - tanh^2 = 1 - (s / c)^2 from the capped logits s; clipped
        # so a masked MASK_VALUE gives 0 (not inf times p = 0).
        ds = ds * (1.0 - jnp.square(jnp.clip(s, -softcap, softcap) / softcap))
      dq = dq + jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(k.dtype), k_t,
                           preferred_element_type=_F32)
      dkt_t = jnp.einsum("bkgdq,bkgqs->bkds", blk["qt"], ds.astype(q.dtype),
                         preferred_element_type=_F32)
      dvt_t = jnp.einsum("bkgdq,bkgqs->bkds", blk["d_out_t"], p.astype(d_out.dtype),
                         preferred_element_type=_F32)
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
          acc, jax.lax.dynamic_slice_in_dim(acc, start, size, axis=3) + x, start, axis=3)
      return dq, add(dkt, dkt_t), add(dvt, dvt_t)

    dq, dkt, dvt = jax.lax.fori_loop(lo[i], hi[i], tile,
                                     (jnp.zeros(blk["q"].shape, _F32), dkt, dvt))
    dq_blocks.append(dq)
  dkt, dvt = jax.lax.optimization_barrier((dkt[..., :k.shape[2]], dvt[..., :k.shape[2]]))
  dk, dv = jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2)
  dq = dq_blocks[0] if len(dq_blocks) == 1 else jnp.concatenate(dq_blocks, axis=3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    scale: float, *, causal: bool, block: int, window: int = 0,
                    skip: bool = True, softcap: float = 0.0) -> jax.Array:
  """Softmax attention within segments, blockwise, with a recomputing backward.

  Same result as `attention.dense_attention(q, k, v, segment_mask(...), scale)` on every
  non-padding query (padding queries, segment 0, attend nowhere; their output is unspecified
  and zeroed by the caller).

  Args:
    q: `[batch, length, heads, head_dim]`.
    k, v: `[batch, length, kv_heads, head_dim]`; heads is a multiple of kv_heads.
    segment_ids: `[batch, length]` int, 0 = padding; each segment one contiguous run.
    scale: multiplier of the logits (1/sqrt(head_dim)).
    causal: attend to keys at or before the query only.
    block: query rows per block and key rows per tile (<= 0 or >= length: one block).
    window: sliding window when causal: a query attends to its last `window` tokens (itself
      included); 0: no window.
    skip: skip key tiles that the window or the segment ids exclude for the whole batch
      (module docstring); False: only the causal mask's static skipping.
    softcap: c > 0 caps the scaled logits to c * tanh(logits / c) (Gemma 2), forward and
      backward; 0: none.
  Returns:
    `[batch, length, heads, head_dim]` in q's dtype.
  """
  b, length, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, length, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  out = _attention(q, k, v, segment_ids, float(scale), bool(causal), int(block), int(window),
                   bool(skip), float(softcap))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, d)

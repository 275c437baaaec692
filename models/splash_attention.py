"""TPU attention: JAX's Pallas splash attention kernel in the model's layout.

`jax.experimental.pallas.ops.tpu.splash_attention` is a FlashAttention kernel for the TPU's
matrix units with its own backward kernels (dq and dkv). Its mask is static (causal, local
window, or full) and processed into a block map at trace time, so whole blocks the mask
excludes are never computed; segment ids (packed documents) are applied inside each block, so a
packed row never attends across documents. The kernel serves one row of heads
`[heads, length, head_dim]`; rows are vmapped, and under a mesh the caller
(models/attention_kernels.py) runs it per device inside `shard_map`.

What this wrapper adds:
  - Grouped-query attention without repeating K/V: the multi-head kernel takes `kv_heads` key
    heads and maps query head h to key head h // (heads / kv_heads) itself.
  - Any length: rows are padded to a multiple of the block with segment id 0 (padding) keys
    and queries, which no real query sees; the padded queries' outputs are dropped.
  - Block sizes: `block` (config.model.attention_kernel_block) for every forward and
    backward tile, or by default the largest of 512 / 256 / 128 rows that pads the row least
    (512 is what large TPU runs use; tiles must be multiples of the 128-lane width).
  - The logits' scale is applied to q before the kernel (the kernel itself does not scale).

`interpret=True` runs the same kernel in Pallas's interpreter (any backend: the CPU tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

# Tile rows must be multiples of the TPU's 128 lanes; larger tiles amortise per-tile overhead.
LANES = 128
BLOCK_CHOICES = (512, 256, 128)


def _padded(length: int, block: int) -> int:
  return -(-length // block) * block


def default_block(length: int) -> int:
  """The tile of `length`-token rows: the largest of BLOCK_CHOICES that pads the row least."""
  return min(BLOCK_CHOICES, key=lambda b: (_padded(length, b), -b))


def block_sizes(block: int) -> splash.BlockSizes:
  """The same `block` for every forward and backward tile (dq and dkv kernels apart)."""
  return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)


def _make_kernel(heads: int, length: int, causal: bool, window: int, block: int,
                 interpret: bool):
  """The kernel of one row of `heads` heads and `length` tokens; its block map (which tiles
  the static mask excludes) is built here, at trace time, in numpy."""
  shape = (length, length)
  if causal and window > 0:
    # Key j is seen by query i when i - (window - 1) <= j <= i.
    mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  elif causal:
    mask = splash.CausalMask(shape)
  else:
    mask = splash.FullMask(shape)
  return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads),
                                block_sizes=block_sizes(block), head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     scale: float, *, causal: bool, window: int = 0, block: int = 0,
                     interpret: bool = False) -> jax.Array:
  """Softmax attention within segments by the splash kernel (one device's rows and heads).

  Same result as `attention.dense_attention(q, k, v, segment_mask(...), scale)` on every
  non-padding query; padding queries' outputs are unspecified (the caller zeroes them).

  Args:
    q: `[batch, length, heads, head_dim]`.
    k, v: `[batch, length, kv_heads, head_dim]`; heads is a multiple of kv_heads.
    segment_ids: `[batch, length]` int, 0 = padding.
    scale: multiplier of the logits.
    causal: attend to keys at or before the query only.
    window: sliding window when causal (a query sees its last `window` tokens); 0: none.
    block: tile rows (a multiple of 128); 0: `default_block(length)`.
    interpret: run the kernel in Pallas's interpreter (tests on CPU).
  Returns:
    `[batch, length, heads, head_dim]` in q's dtype.
  """
  if block % LANES:
    raise ValueError(f"splash tiles are multiples of {LANES} rows, got {block}")
  _, length, h, _ = q.shape
  block = block or default_block(length)
  padded = _padded(length, block)
  if padded != length:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
  kernel = _make_kernel(h, padded, bool(causal), int(window), int(block), bool(interpret))
  # [batch, heads, length, head_dim]: the kernel's layout, one row at a time.
  q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  per_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(seg, seg))
  out = jax.vmap(per_row)(q, k, v, segment_ids.astype(jnp.int32))
  return out.transpose(0, 2, 1, 3)[:, :length]

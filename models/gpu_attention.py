"""GPU attention: cuDNN's fused flash attention and JAX's Pallas (Triton) flash kernel.

Two kernels, because they serve different rows:

  cudnn       `jax.nn.dot_product_attention(..., implementation="cudnn")`. Causal or
              bidirectional, a left sliding window (causal only), grouped KV heads, and per-row
              valid lengths: a row is ONE document from slot 0, padding after it. That entry
              takes no segment ids (jax 0.10.2; cuDNN's packed layout is reachable only
              through JAX's private fused-attention module, Hopper and later), so packed rows
              (several documents, or a DPO pair's two sides) and left-padded rows are outside
              it: config validation refuses it for every training stage, all of which pack
              (models/attention_kernels.py). Compute dtype bfloat16 / float16 only; head_dim
              a multiple of 8, at most 128 (256 from Hopper on).
  pallas_gpu  `jax.experimental.pallas.ops.gpu.attention.mha`: FlashAttention-2 in Triton with
              segment ids (packed rows never attend across documents), causal block skipping
              and Triton backward kernels. It has no sliding window and wants one key head per
              query head: grouped-query attention is vmapped over the groups, each call pairing
              `kv_heads` query heads with the `kv_heads` key heads (K/V are never repeated in
              memory; their gradients sum over the groups). Rows are padded to a multiple of
              the block with segment id 0, which no real query sees.

Neither ever builds a `[length, length]` mask. `interpret=True` runs the Pallas kernel in
Pallas's interpreter (the CPU tests); cuDNN needs the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

# Forward tiles (Triton's usual 128; 64 for float32, whose 128-row tiles of head_dim 128
# overflow a Hopper SM's shared memory), backward tiles (the kernel's defaults).
PALLAS_BLOCK = 128
PALLAS_BLOCK_FLOAT32 = 64
PALLAS_BACKWARD_BLOCK = 32
CUDNN_DTYPES = ("bfloat16", "float16")


def cudnn_problem(*, dtype: str, head_dim: int, causal: bool, window: int,
                  hopper: bool = True) -> str | None:
  """Why cuDNN cannot serve a layer (None: it can), apart from the row layout (module doc)."""
  if dtype not in CUDNN_DTYPES:
    return f"cuDNN flash attention computes in {' / '.join(CUDNN_DTYPES)}, not {dtype}"
  limit = 256 if hopper else 128
  if head_dim % 8 or head_dim > limit:
    return f"cuDNN takes head_dim a multiple of 8 up to {limit}, got {head_dim}"
  if window and not causal:
    return "cuDNN's sliding window is causal only"
  return None


def pallas_gpu_problem(*, head_dim: int, window: int) -> str | None:
  """Why the Pallas GPU kernel cannot serve a layer (None: it can)."""
  if window:
    return "the Pallas GPU kernel has no sliding window"
  if head_dim < 16:
    # Triton's dot needs at least 16 along the contraction.
    return f"the Pallas GPU kernel takes head_dim >= 16, got {head_dim}"
  return None


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    scale: float, *, causal: bool, window: int = 0) -> jax.Array:
  """cuDNN flash attention of rows that each hold one document from slot 0.

  Args:
    q: `[batch, length, heads, head_dim]`, bfloat16 or float16.
    k, v: `[batch, length, kv_heads, head_dim]`.
    segment_ids: `[batch, length]`: a row's non-zero ids must be its first tokens (one
      document); their count is the row's length for cuDNN's padding mask.
    scale: multiplier of the logits.
    causal: attend to keys at or before the query only.
    window: causal sliding window (a query sees its last `window` tokens); 0: none.
  Returns:
    `[batch, length, heads, head_dim]`; queries past a row's length are unspecified.
  """
  lengths = jnp.sum(segment_ids > 0, axis=1).astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=causal, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, local_window_size=(window - 1, 0) if window else None,
      implementation="cudnn")


def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                         scale: float, *, causal: bool, block: int = 0,
                         interpret: bool = False) -> jax.Array:
  """Softmax attention within segments by the Pallas GPU (Triton) kernel.

  Same result as `attention.dense_attention(q, k, v, segment_mask(...), scale)` on every
  non-padding query; padding queries' outputs are unspecified (the caller zeroes them).

  Args:
    q: `[batch, length, heads, head_dim]`.
    k, v: `[batch, length, kv_heads, head_dim]`; heads is a multiple of kv_heads.
    segment_ids: `[batch, length]` int, 0 = padding.
    scale: multiplier of the logits.
    causal: attend to keys at or before the query only.
    block: forward tile rows (0: 128, float32 64); the backward tiles are 32 rows.
    interpret: run in Pallas's interpreter (tests on CPU).
  Returns:
    `[batch, length, heads, head_dim]` in q's dtype.
  """
  b, length, h, d = q.shape
  kh = k.shape[2]
  block = block or (PALLAS_BLOCK if q.dtype.itemsize <= 2 else PALLAS_BLOCK_FLOAT32)
  padded = -(-length // block) * block
  if padded != length:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
  sizes = pallas_gpu.BlockSizes(
      block_q=block, block_k=block, block_q_dkv=PALLAS_BACKWARD_BLOCK,
      block_kv_dkv=PALLAS_BACKWARD_BLOCK, block_q_dq=PALLAS_BACKWARD_BLOCK,
      block_kv_dq=PALLAS_BACKWARD_BLOCK)
  segment_ids = segment_ids.astype(jnp.int32)

  def one_group(q_group):  # [batch, length, kv_heads, head_dim]: query head j of each group
    return pallas_gpu.mha(q_group, k, v, segment_ids, sm_scale=scale, causal=causal,
                          block_sizes=sizes, interpret=interpret)

  # Query head i belongs to key head i // groups: [batch, length, kv_heads, groups, head_dim].
  grouped = q.reshape(b, padded, kh, h // kh, d)
  out = jax.vmap(one_group, in_axes=3, out_axes=3)(grouped)
  return out.reshape(b, padded, h, d)[:, :length]

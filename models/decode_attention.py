"""One decode step's attention over the KV cache as one Pallas (Triton) kernel, for GPUs.

The XLA form (models/kv_cache.py `attend`) is right on every platform, but XLA:GPU runs it as
about seven kernels a layer (the scores, their maximum, the exponentials and their sum, the
division, the weighted values, the new token's part), each a launch over small data: compiled
for an H200, attention was 112 of the 1B decode step's 259 kernels (scripts/decode_check.py).
Here one program per (row, key head) streams that row's cached keys and values once, in blocks
of `BLOCK_K` slots, with the online softmax of FlashAttention (running maximum m, sum l and
weighted values o, rescaled as the maximum grows), then folds in the new token itself and
normalises:

    s_j = scale * q . k_j                   (soft-capped: c tanh(s_j / c))
    over cached slots j with segment_ids[j] == the query's segment, j < index, and
    j > index - window (a sliding window), then the new token;
    out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m)

so it gives `attend`'s result for one new token per row. The query heads of a key head
(grouped-query attention) are the rows of one matrix product against the key block, padded to
Triton's smallest tile (`BLOCK_H`).

Constraints (`problem` names the one that fails; the caller then keeps the XLA form): the
cache length a multiple of BLOCK_K (the GPU sampler allocates it so), head_dim a power of two
of at least 16 (Triton's tiles), and at most BLOCK_H query heads per key head. Under a mesh
the kernel sees one device's rows and key heads (models/attention_kernels.py
`decode_per_device`, inside `shard_map`), and the constraints apply to that share.
`interpret=True` runs the kernel in Pallas's interpreter, which is how the CPU tests check it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models.flash_attention import MASK_VALUE

BLOCK_K = 64   # cache slots per step of a program's loop
BLOCK_H = 16   # query heads per key head, padded: Triton's smallest dot tile


def problem(*, head_dim: int, heads: int, kv_heads: int, cache_len: int) -> str | None:
  """Why the kernel cannot serve a layer (None: it can)."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    return f"head_dim {head_dim} is not a power of two >= 16"
  if heads // kv_heads > BLOCK_H:
    return f"{heads // kv_heads} query heads per key head, more than {BLOCK_H}"
  if cache_len % BLOCK_K:
    return f"cache length {cache_len} is not a multiple of {BLOCK_K}"
  return None


def cache_length(length: int) -> int:
  """`length` cache slots rounded up to whole kernel blocks."""
  return -(-length // BLOCK_K) * BLOCK_K


def _kernel(q_ref, k_ref, v_ref, seg_ref, meta_ref, k_new_ref, v_new_ref, o_ref, *,
            scale: float, window: int, softcap: float, groups: int):
  rows = pl.ds(0, BLOCK_H)
  live = jnp.arange(BLOCK_H) < groups
  q = plgpu.load(q_ref.at[rows, :], mask=live[:, None], other=0.0)
  q_segment, index = meta_ref[0], meta_ref[1]
  head_dim = q.shape[-1]

  def capped(s):
    return softcap * jnp.tanh(s / softcap) if softcap else s

  def block(i, carry):
    o, m, l = carry
    slots = pl.ds(i * BLOCK_K, BLOCK_K)
    k = k_ref[slots, :]
    s = capped(plgpu.dot(q, k.T).astype(jnp.float32) * scale)      # [BLOCK_H, BLOCK_K]
    slot = i * BLOCK_K + jnp.arange(BLOCK_K)
    seen = (seg_ref[slots] == q_segment) & (slot < index)
    if window:
      seen = seen & (slot > index - window)
    s = jnp.where(seen[None, :], s, MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=-1))
    correction = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next[:, None])
    v = v_ref[slots, :]
    o = correction[:, None] * o + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return o, m_next, correction * l + p.sum(axis=-1)

  o = jnp.zeros((BLOCK_H, head_dim), jnp.float32)
  m = jnp.full((BLOCK_H,), MASK_VALUE, jnp.float32)
  l = jnp.zeros((BLOCK_H,), jnp.float32)
  o, m, l = jax.lax.fori_loop(0, pl.cdiv(index, BLOCK_K), block, (o, m, l))
  # The new token attends to itself (its key and value are not in the cache yet).
  k_new = k_new_ref[...].astype(jnp.float32)
  v_new = v_new_ref[...].astype(jnp.float32)
  s_new = capped((q.astype(jnp.float32) * k_new[None, :]).sum(axis=-1) * scale)
  s_new = jnp.where(q_segment > 0, s_new, MASK_VALUE)
  m_next = jnp.maximum(m, s_new)
  correction = jnp.exp(m - m_next)
  p_new = jnp.exp(s_new - m_next)
  o = correction[:, None] * o + p_new[:, None] * v_new[None, :]
  l = correction * l + p_new
  plgpu.store(o_ref.at[rows, :], (o / l[:, None]).astype(o_ref.dtype), mask=live[:, None])


@functools.partial(jax.jit, static_argnames=("layer", "scale", "window", "softcap",
                                             "interpret"))
def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, q_segments: jax.Array,
                     cache_k: jax.Array, cache_v: jax.Array, cache_segments: jax.Array,
                     index: jax.Array, *, layer: int | None = None, scale: float,
                     window: int = 0, softcap: float = 0.0, interpret: bool = False
                     ) -> jax.Array:
  """One new token per row over one layer's cache (module doc): `kv_cache.attend`'s result.

  Args:
    q: `[batch, 1, heads, head_dim]`.
    k_new, v_new: `[batch, 1, kv_heads, head_dim]`, the new token's key and value.
    q_segments: `[batch, 1]` its segment id (0: a padding row, output unspecified).
    cache_k, cache_v: `[batch, kv_heads, cache_len, head_dim]` (models/kv_cache.py layout),
      or with `layer` the stacked `[layers, batch, ...]` buffers, read in place at `layer`.
    cache_segments: `[batch, cache_len]`; index: `[]` the slots written so far.
    scale, window, softcap: as `kv_cache.attend`.
    interpret: run in Pallas's interpreter (CPU tests).
  Returns:
    `[batch, 1, heads, head_dim]` in q's dtype.
  """
  b, _, h, d = q.shape
  kh = k_new.shape[2]
  cache_len = cache_k.shape[-2]
  reason = problem(head_dim=d, heads=h, kv_heads=kh, cache_len=cache_len)
  if reason and not interpret:
    raise ValueError(f"decode_attention: {reason}")
  groups = h // kh
  meta = jnp.stack([q_segments[:, 0].astype(jnp.int32),
                    jnp.broadcast_to(index.astype(jnp.int32), (b,))], axis=1)
  kernel = functools.partial(_kernel, scale=scale, window=window, softcap=softcap,
                             groups=groups)
  per_head = lambda i, j: (i, j, 0, 0)
  if layer is None:
    cache_spec = pl.BlockSpec((None, None, cache_len, d), per_head)
  else:  # the layer's block of the stacked cache, no copy
    cache_spec = pl.BlockSpec((None, None, None, cache_len, d), lambda i, j: (layer, i, j, 0, 0))
  out = pl.pallas_call(
      kernel,
      grid=(b, kh),
      in_specs=[
          pl.BlockSpec((None, None, BLOCK_H, d), per_head),          # q [b, kh, groups, d]
          cache_spec,                                                # cached keys
          cache_spec,                                                # cached values
          pl.BlockSpec((None, cache_len), lambda i, j: (i, 0)),      # slot segment ids
          pl.BlockSpec((None, 2), lambda i, j: (i, 0)),              # (segment, index)
          pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)),     # new key
          pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)),     # new value
      ],
      out_specs=pl.BlockSpec((None, None, BLOCK_H, d), per_head),
      out_shape=jax.ShapeDtypeStruct((b, kh, groups, d), q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="decode_attention",
  )(q.reshape(b, kh, groups, d), cache_k, cache_v, cache_segments.astype(jnp.int32), meta,
    k_new.reshape(b, kh, d), v_new.reshape(b, kh, d))
  return out.reshape(b, 1, h, d)

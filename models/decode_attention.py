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

`decode_attention_joined` starts one step earlier, from the layer's joined q / k / v
projection (models/attention.py, when sampling unrolled): a program reads its key head's query
rows, key and value from their columns of the row's projection, applies RoPE (the half-split
rotation of models/layers.py `apply_rope`, from the position's cos / sin) to the query and
key, scores each cached key as the sum of the two halves' products, and writes the rotated
key and the value out for the cache. XLA would otherwise launch three kernels a layer before
the attention (the query's rotation, the key's, the value split out of the projection):
compiled for an H200, 48 of the 1B decode step's 195 kernels.

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


def problem(*, head_dim: int, heads: int, kv_heads: int, cache_len: int,
            joined: bool = False) -> str | None:
  """Why the kernel (`joined`: `decode_attention_joined`) cannot serve a layer (None: it can)."""
  if head_dim < 16 or head_dim & (head_dim - 1):
    return f"head_dim {head_dim} is not a power of two >= 16"
  if joined and head_dim < 32:
    return f"head_dim {head_dim}: RoPE's halves under 16 columns"
  if heads // kv_heads > BLOCK_H:
    return f"{heads // kv_heads} query heads per key head, more than {BLOCK_H}"
  if cache_len % BLOCK_K:
    return f"cache length {cache_len} is not a multiple of {BLOCK_K}"
  return None


def cache_length(length: int) -> int:
  """`length` cache slots rounded up to whole kernel blocks."""
  return -(-length // BLOCK_K) * BLOCK_K


def _attend(q_parts, cols, k_new_parts, v_new, k_ref, v_ref, seg_ref, meta_ref, *,
            scale: float, window: int, softcap: float):
  """The online softmax over one (row, key head)'s cached slots, then its new token.

  The query rows come in column parts (`q_parts[i]` `[BLOCK_H, width]` holds the columns
  `cols[i]` of head_dim; one part, or RoPE's two halves) and so does the new key; a score is
  the sum of the parts' products. Returns the `[BLOCK_H, head_dim]` attention output, float32.
  """
  q_segment, index = meta_ref[0], meta_ref[1]
  head_dim = v_new.shape[-1]

  def capped(s):
    return softcap * jnp.tanh(s / softcap) if softcap else s

  def block(i, carry):
    o, m, l = carry
    slots = pl.ds(i * BLOCK_K, BLOCK_K)
    s = sum(plgpu.dot(q, k_ref[slots, c].T).astype(jnp.float32) for q, c in zip(q_parts, cols))
    s = capped(s * scale)                                           # [BLOCK_H, BLOCK_K]
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
  s_new = sum((q.astype(jnp.float32) * k[None, :].astype(jnp.float32)).sum(axis=-1)
              for q, k in zip(q_parts, k_new_parts))
  s_new = jnp.where(q_segment > 0, capped(s_new * scale), MASK_VALUE)
  m_next = jnp.maximum(m, s_new)
  correction = jnp.exp(m - m_next)
  p_new = jnp.exp(s_new - m_next)
  o = correction[:, None] * o + p_new[:, None] * v_new[None, :].astype(jnp.float32)
  return o / (correction * l + p_new)[:, None]


def _kernel(q_ref, k_ref, v_ref, seg_ref, meta_ref, k_new_ref, v_new_ref, o_ref, *,
            scale: float, window: int, softcap: float, groups: int):
  rows = pl.ds(0, BLOCK_H)
  live = jnp.arange(BLOCK_H) < groups
  q = plgpu.load(q_ref.at[rows, :], mask=live[:, None], other=0.0)
  everything = slice(None)
  o = _attend([q], [everything], [k_new_ref[...]], v_new_ref[...], k_ref, v_ref, seg_ref,
              meta_ref, scale=scale, window=window, softcap=softcap)
  plgpu.store(o_ref.at[rows, :], o.astype(o_ref.dtype), mask=live[:, None])


def _rotate(x1, x2, cos, sin, dtype):
  """RoPE's rotation of the half-split head (models/layers.py `apply_rope`), in float32,
  rounded to `dtype` as the XLA form rounds it."""
  x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
  return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)


def _joined_kernel(qkv_ref, cos_ref, sin_ref, k_ref, v_ref, seg_ref, meta_ref, o_ref,
                   k_out_ref, v_out_ref, *, scale: float, window: int, softcap: float,
                   groups: int, heads: int, kv_heads: int):
  """`_kernel` from the row's joined q / k / v projection, RoPE applied here: the key
  head's query rows and its new key and value are read from their columns, the query and key
  rotated, and the rotated key and the value written out for the cache."""
  j = pl.program_id(1)
  half = cos_ref.shape[-1]
  first, second = pl.ds(0, half), pl.ds(half, half)
  cos, sin = cos_ref[...], sin_ref[...]
  live = jnp.arange(BLOCK_H) < groups
  rows = pl.ds(j * groups, BLOCK_H)  # the key head's query heads
  load_q = lambda c: plgpu.load(qkv_ref.at[rows, c], mask=live[:, None], other=0.0)
  q1, q2 = _rotate(load_q(first), load_q(second), cos[None, :], sin[None, :], qkv_ref.dtype)
  k1, k2 = _rotate(qkv_ref[heads + j, first], qkv_ref[heads + j, second], cos, sin,
                   k_out_ref.dtype)
  v_new = qkv_ref[heads + kv_heads + j, :]
  o = _attend([q1, q2], [first, second], [k1, k2], v_new, k_ref, v_ref, seg_ref, meta_ref,
              scale=scale, window=window, softcap=softcap)
  plgpu.store(o_ref.at[pl.ds(0, BLOCK_H), :], o.astype(o_ref.dtype), mask=live[:, None])
  k_out_ref[first] = k1
  k_out_ref[second] = k2
  v_out_ref[...] = v_new.astype(v_out_ref.dtype)


def _cache_specs(b: int, cache_len: int, d: int, layer: int | None) -> list[pl.BlockSpec]:
  """BlockSpecs of the cached keys, values, slot segment ids and (segment, index) pairs: a
  program's (row, key head) block of the layer's cache (of the stacked cache at `layer`, read
  in place), its row's segment ids and pair."""
  if layer is None:
    cache = pl.BlockSpec((None, None, cache_len, d), lambda i, j: (i, j, 0, 0))
  else:
    cache = pl.BlockSpec((None, None, None, cache_len, d), lambda i, j: (layer, i, j, 0, 0))
  return [cache, cache, pl.BlockSpec((None, cache_len), lambda i, j: (i, 0)),
          pl.BlockSpec((None, 2), lambda i, j: (i, 0))]


def _check(d: int, h: int, kh: int, cache_len: int, interpret: bool, joined: bool = False):
  reason = problem(head_dim=d, heads=h, kv_heads=kh, cache_len=cache_len, joined=joined)
  if reason and not interpret:
    raise ValueError(f"decode_attention: {reason}")


def _meta(q_segments: jax.Array, index: jax.Array) -> jax.Array:
  """`[batch, 2]`: each row's (new token's segment id, slots written)."""
  b = q_segments.shape[0]
  return jnp.stack([q_segments[:, 0].astype(jnp.int32),
                    jnp.broadcast_to(index.astype(jnp.int32), (b,))], axis=1)


_PARAMS = dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
               name="decode_attention")


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
  _check(d, h, kh, cache_len, interpret)
  groups = h // kh
  per_head = lambda i, j: (i, j, 0, 0)
  cached = _cache_specs(b, cache_len, d, layer)
  out = pl.pallas_call(
      functools.partial(_kernel, scale=scale, window=window, softcap=softcap, groups=groups),
      grid=(b, kh),
      in_specs=[
          pl.BlockSpec((None, None, BLOCK_H, d), per_head),          # q [b, kh, groups, d]
          *cached,
          pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)),     # new key
          pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)),     # new value
      ],
      out_specs=pl.BlockSpec((None, None, BLOCK_H, d), per_head),
      out_shape=jax.ShapeDtypeStruct((b, kh, groups, d), q.dtype),
      interpret=interpret, **_PARAMS,
  )(q.reshape(b, kh, groups, d), cache_k, cache_v, cache_segments.astype(jnp.int32),
    _meta(q_segments, index), k_new.reshape(b, kh, d), v_new.reshape(b, kh, d))
  return out.reshape(b, 1, h, d)


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads", "layer", "scale", "window",
                                             "softcap", "interpret"))
def decode_attention_joined(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                            q_segments: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                            cache_segments: jax.Array, index: jax.Array, *, heads: int,
                            kv_heads: int, layer: int | None = None, scale: float,
                            window: int = 0, softcap: float = 0.0, interpret: bool = False
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`decode_attention` from the joined q / k / v projection, before RoPE: the kernel takes
  each key head's columns and rotates the query and key itself, so the step launches no
  kernels for RoPE or for splitting the projection (module doc).

  Args:
    qkv: `[batch, 1, (heads + 2 kv_heads) * head_dim]`, the query heads' columns, then the
      key heads', then the value heads' (models/attention.py's joined kernel).
    cos, sin: `[batch, 1, head_dim // 2]` RoPE's tables at the new token's position
      (models/layers.py `rope_tables`).
    others: as `decode_attention`.
  Returns:
    `(out [batch, 1, heads, head_dim], k_new, v_new [batch, 1, kv_heads, head_dim])`: the
    attention output and the rotated key and the value for the cache, in qkv's dtype.
  """
  b, d = qkv.shape[0], cos.shape[-1] * 2
  cache_len = cache_k.shape[-2]
  _check(d, heads, kv_heads, cache_len, interpret, joined=True)
  groups = heads // kv_heads
  row = lambda i, j: (i, 0)
  new = pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0))
  out, k_new, v_new = pl.pallas_call(
      functools.partial(_joined_kernel, scale=scale, window=window, softcap=softcap,
                        groups=groups, heads=heads, kv_heads=kv_heads),
      grid=(b, kv_heads),
      in_specs=[
          pl.BlockSpec((None, heads + 2 * kv_heads, d), lambda i, j: (i, 0, 0)),  # the row
          pl.BlockSpec((None, d // 2), row),                                     # cos
          pl.BlockSpec((None, d // 2), row),                                     # sin
          *_cache_specs(b, cache_len, d, layer),
      ],
      out_specs=[pl.BlockSpec((None, None, BLOCK_H, d), lambda i, j: (i, j, 0, 0)), new, new],
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, groups, d), qkv.dtype),
                 jax.ShapeDtypeStruct((b, kv_heads, d), qkv.dtype),
                 jax.ShapeDtypeStruct((b, kv_heads, d), qkv.dtype)],
      interpret=interpret, **_PARAMS,
  )(qkv.reshape(b, heads + 2 * kv_heads, d), cos.reshape(b, d // 2).astype(jnp.float32),
    sin.reshape(b, d // 2).astype(jnp.float32), cache_k, cache_v,
    cache_segments.astype(jnp.int32), _meta(q_segments, index))
  return (out.reshape(b, 1, heads, d), k_new.reshape(b, 1, kv_heads, d),
          v_new.reshape(b, 1, kv_heads, d))

"""Key/value cache for incremental decoding, and attention of new tokens over it.

One `KVCache` serves the whole decoder: keys and values of every layer stacked along a leading
`layers` axis, the segment id of every cache slot, and the slot the next token is written to.
All rows of a batch advance in lockstep: prompts are left-padded to one length, so slot `index`
is the same for every row.

    k, v          [layers, batch, kv_heads, cache_len, head_dim]
    segment_ids   [batch, cache_len]   0 = empty slot or prompt padding (never attended)
    index         []                   slot of the next token written

Head-major layout: a decode step's attention then reads each (row, kv head)'s slots as
contiguous memory; with the `[batch, length, heads, ...]` layout of training, XLA:CPU
transposes the whole cache first and decoding is several times slower (README, "Benchmarks").
A decode step (one new token per row) scores the cache by multiply-and-sum rather than as a
matrix product: XLA fuses it into one pass over the cache, where a GEMM of one row pads the
cache to its tile every step (seen on GPU). Not on TPU, where that form made XLA write each
layer's cache out converted to float32 every step and the matrix unit reads it as stored
(scripts/decode_check.py, tests/scripts/test_decode_check.py); on GPUs an unrolled decode
step runs models/decode_attention.py's kernel instead, on each device's rows and heads. The
softmax over cached slots and new tokens is taken in two parts, so the scores are never
concatenated.

A step: each layer attends from the new tokens to its cached slots plus the new tokens
themselves (`attend`) and hands back their keys / values; after the last layer `append`
writes all layers' new entries at `index` at once. Inside the layer stack the cache is only
read, so the big buffers are written once per step, in place (a loop-carried update).

A query of segment `s` sees the cached slots `j < index` of segment `s` and the new tokens of
segment `s` at or before it: padding and unwritten slots carry segment 0 and are never seen,
so a left-padded row computes exactly what it computes alone.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from models.attention_kernels import decode_per_device, step_platform
from models.decode_attention import decode_attention, decode_attention_joined
from models.flash_attention import MASK_VALUE
from models.layers import dtype_of
from parallel.rules import Rules, constrain, tree_shardings

# Logical names: the activation names attention already uses, so every rules preset covers
# them (`layers` is the scanned-stack parameter name, replicated by every preset).
KV_AXES = ("layers", "batch", "act_kv_heads", "length", "act_head_dim")
# The new tokens' queries and keys / values, `[batch, new_len, heads, head_dim]`.
_Q_AXES = ("batch", "length", "act_heads", "act_head_dim")
_KV_NEW_AXES = ("batch", "length", "act_kv_heads", "act_head_dim")


class KVCache(NamedTuple):
  """The stacked cache; inside a layer, the same tuple holds that layer's `k, v` slices
  `[batch, kv_heads, cache_len, head_dim]`, or (`layer`, an int) still the stacked buffers
  and the layer to read from them: an unrolled layer stack passes the stack so that the GPU
  decode kernel reads its layer in place (a slice passed to a kernel is first copied out)."""
  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  index: jax.Array
  layer: int | None = None


def cache_logical_axes() -> KVCache:
  """Logical axis names of each field of a (stacked) `KVCache`."""
  return KVCache(k=KV_AXES, v=KV_AXES, segment_ids=("batch", "length"), index=())


def cache_shapes(cfg: ml_collections.ConfigDict, batch: int, length: int) -> KVCache:
  """`jax.ShapeDtypeStruct`s of a cache of `length` slots for model config `cfg`."""
  head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
  kv = jax.ShapeDtypeStruct((cfg.num_layers, batch, cfg.num_kv_heads, length, head_dim),
                            dtype_of(cfg.dtype))
  return KVCache(k=kv, v=kv, segment_ids=jax.ShapeDtypeStruct((batch, length), jnp.int32),
                 index=jax.ShapeDtypeStruct((), jnp.int32))


def cache_shardings(cfg: ml_collections.ConfigDict, batch: int, length: int, mesh, rules: Rules
                    ) -> KVCache:
  """NamedShardings of a cache on `mesh` by `rules` (batch split, heads split under TP)."""
  return tree_shardings(cache_logical_axes(), cache_shapes(cfg, batch, length), mesh, rules)


def init_cache(cfg: ml_collections.ConfigDict, batch: int, length: int) -> KVCache:
  """An empty cache (every slot segment 0, index 0), sharded by the active mesh rules."""
  shapes, axes = cache_shapes(cfg, batch, length), cache_logical_axes()
  return KVCache(*(constrain(jnp.zeros(s.shape, s.dtype), names)
                   for s, names in zip(shapes[:4], axes[:4])))


def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array, q_segments: jax.Array,
           layer: KVCache, scale: float, window: int = 0, softcap: float = 0.0,
           kernel: bool = False) -> jax.Array:
  """Softmax attention of new tokens over one layer's cached slots and over each other.

  Args:
    q: `[batch, new_len, heads, head_dim]` queries of the new tokens.
    k_new, v_new: `[batch, new_len, kv_heads, head_dim]` their keys / values.
    q_segments: `[batch, new_len]` their segment ids (0: padding, attends nowhere).
    layer: this layer's cache before the new tokens (k, v head-major).
    scale: logit multiplier (1 / sqrt(head_dim)).
    window: sliding window (a query attends to its last `window` tokens); 0: none. A row's
      slots hold consecutive tokens, so slot distance is token distance.
    softcap: c > 0 caps the scaled logits to c * tanh(logits / c) (Gemma 2); 0: none.
    kernel: a decode step (new_len 1) runs models/decode_attention.py's GPU kernel, which
      computes the same in one launch (models/attention_kernels.py `decode_kernel` decides).
  Returns:
    `[batch, new_len, heads, head_dim]`, in q's dtype.
  """
  b, n, h, d = q.shape
  kh = k_new.shape[2]
  if n == 1 and kernel:
    run = functools.partial(decode_attention, layer=layer.layer, scale=scale, window=window,
                            softcap=softcap)
    return decode_per_device(
        run, (q, k_new, v_new, q_segments, layer.k, layer.v, layer.segment_ids, layer.index),
        (_Q_AXES, _KV_NEW_AXES, _KV_NEW_AXES, ("batch", "length"), *_cache_axes(layer),
         ("batch", "length"), ()), _Q_AXES)
  if layer.layer is not None:
    layer = layer._replace(k=layer.k[layer.layer], v=layer.v[layer.layer], layer=None)
  q = q.reshape(b, n, kh, h // kh, d)
  f32 = jnp.float32
  # Decode (one query per row) off TPU: multiply-and-sum lets XLA read the cache in one fused
  # pass; as a dot_general the one-row product is padded to the GEMM's tile and split over
  # several kernels (GPU: pads of the whole cache every step). XLA:TPU instead writes the
  # float32 product's operand, the layer's whole cache converted, out first (twice the bytes,
  # written and read again each step), where its matrix unit takes the bfloat16 cache as it is.
  elementwise = n == 1 and step_platform() != "tpu"
  if elementwise:
    old = jnp.sum(q[:, 0, :, :, None, :].astype(f32) * layer.k[:, :, None].astype(f32),
                  axis=-1)[:, :, :, None]
  else:
    old = jnp.einsum("bnkgd,bksd->bkgns", q, layer.k, preferred_element_type=f32)
  old = old * scale
  new = jnp.einsum("bnkgd,bmkd->bkgnm", q, k_new, preferred_element_type=f32) * scale
  if softcap:
    old, new = softcap * jnp.tanh(old / softcap), softcap * jnp.tanh(new / softcap)
  valid = q_segments[:, :, None] > 0
  slots = jnp.arange(layer.segment_ids.shape[1])
  old_mask = ((layer.segment_ids[:, None, :] == q_segments[:, :, None]) & valid
              & (slots < layer.index)[None, None, :])
  causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
  if window > 0:
    # Query i sits at slot index + i: old slot s is in its window when s > index + i - window.
    q_slot = layer.index + jnp.arange(n)
    old_mask = old_mask & (slots[None, :] > q_slot[:, None] - window)[None]
    causal = causal & (jnp.arange(n)[None, :] > jnp.arange(n)[:, None] - window)
  new_mask = (q_segments[:, :, None] == q_segments[:, None, :]) & valid & causal[None]
  old = jnp.where(old_mask[:, None, None], old, MASK_VALUE)
  new = jnp.where(new_mask[:, None, None], new, MASK_VALUE)
  # One softmax over the cached slots and the new tokens together, in two parts (no
  # concatenated copy of the scores).
  top = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
  old, new = jnp.exp(old - top), jnp.exp(new - top)
  total = old.sum(-1, keepdims=True) + new.sum(-1, keepdims=True)
  old, new = (old / total).astype(v_new.dtype), (new / total).astype(v_new.dtype)
  if elementwise:
    cached = jnp.sum(old[:, :, :, 0, :, None].astype(f32) * layer.v[:, :, None].astype(f32),
                     axis=3)[:, None].astype(v_new.dtype)
  else:
    cached = jnp.einsum("bkgns,bksd->bnkgd", old, layer.v)
  out = cached + jnp.einsum("bkgnm,bmkd->bnkgd", new, v_new)
  return out.reshape(b, n, h, d).astype(q.dtype)


def _cache_axes(layer: KVCache) -> tuple[tuple, tuple]:
  """Logical axes of the keys and values a layer reads: the stacked buffers (`layer.layer`
  set) or the layer's own slice."""
  axes = KV_AXES if layer.layer is not None else KV_AXES[1:]
  return axes, axes


def attend_joined(qkv: jax.Array, cos: jax.Array, sin: jax.Array, q_segments: jax.Array,
                  layer: KVCache, scale: float, *, heads: int, kv_heads: int, window: int = 0,
                  softcap: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A decode step's attention from the joined q / k / v projection before RoPE, by
  models/decode_attention.py's kernel (`decode_attention_joined`: the split and the rotation
  happen inside it), on each device's rows.

  Args:
    qkv: `[batch, 1, (heads + 2 kv_heads) * head_dim]`; cos, sin: `[batch, 1, head_dim // 2]`.
    others: as `attend`.
  Returns:
    `(out [batch, 1, heads, head_dim], k_new, v_new [batch, 1, kv_heads, head_dim])`, the key
    rotated: what `append` stores.
  """
  run = functools.partial(decode_attention_joined, heads=heads, kv_heads=kv_heads,
                          layer=layer.layer, scale=scale, window=window, softcap=softcap)
  rows = ("batch", "length", None)
  return decode_per_device(
      run, (qkv, cos, sin, q_segments, layer.k, layer.v, layer.segment_ids, layer.index),
      (rows, rows, rows, ("batch", "length"), *_cache_axes(layer), ("batch", "length"), ()),
      [_Q_AXES, _KV_NEW_AXES, _KV_NEW_AXES])


def append(cache: KVCache, k_new: jax.Array, v_new: jax.Array, segment_ids: jax.Array
           ) -> KVCache:
  """Writes every layer's new keys / values and the tokens' segment ids at `index`, and
  advances it.

  Args:
    cache: the stacked cache.
    k_new, v_new: `[layers, batch, new_len, kv_heads, head_dim]`.
    segment_ids: `[batch, new_len]`.
  """
  start = (0, 0, 0, cache.index, 0)
  head_major = lambda x, like: jnp.swapaxes(x, 2, 3).astype(like.dtype)
  k = jax.lax.dynamic_update_slice(cache.k, head_major(k_new, cache.k), start)
  v = jax.lax.dynamic_update_slice(cache.v, head_major(v_new, cache.v), start)
  seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                     (0, cache.index))
  return KVCache(k=constrain(k, KV_AXES), v=constrain(v, KV_AXES), segment_ids=seg,
                 index=cache.index + segment_ids.shape[1])

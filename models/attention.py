"""Multi-head / grouped-query self-attention over packed rows.

Packing contract: `segment_ids [batch, length]` numbers the documents of a row 1, 2, ...; 0 is
padding. A token attends to earlier-or-equal tokens of its own segment only; padding attends
nowhere (its output is zero). `positions [batch, length]` restart at 0 in every segment and feed
the rotary embedding, so a packed document is computed exactly as if it were alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import kv_cache
# MASK_VALUE: large negative instead of -inf, so a fully masked (padding) row softmaxes to a
# finite uniform distribution instead of NaN (and is zeroed afterwards).
from models.flash_attention import (  # noqa: F401 (segment_mask re-exported)
    MASK_VALUE, flash_attention, segment_mask)
from models.layers import apply_rope, dense, dtype_of, param, rope_scaling_of, rope_tables
from parallel.rules import constrain


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    scale: float) -> jax.Array:
  """Softmax attention with grouped KV heads.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k, v: `[batch, kv_len, kv_heads, head_dim]`; heads is a multiple of kv_heads.
    mask: `[batch, q_len, kv_len]` boolean, True where attention is allowed.
    scale: multiplier of the logits (1/sqrt(head_dim)).
  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype.
  """
  b, lq, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, lq, kh, h // kh, d)
  logits = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
  return out.reshape(b, lq, h, d)


class Attention(nnx.Module):
  """Self-attention with optional grouped-query heads, QKV biases and rotary positions."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, h, kh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
    hd = cfg.head_dim or d // h
    if h % kh:
      raise ValueError(f"config.model: num_heads {h} is not a multiple of num_kv_heads {kh}")
    self.num_heads, self.num_kv_heads, self.head_dim = h, kh, hd
    self.dtype = dtype_of(cfg.dtype)
    self.use_rope = cfg.position == "rope"
    self.rope_theta = cfg.rope_theta
    self.rope_scaling = rope_scaling_of(cfg)
    self.causal = True
    self.impl = cfg.attention
    self.block = cfg.attention_block
    self.window = cfg.get("sliding_window", 0) or 0
    pdt = dtype_of(cfg.param_dtype)
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    self.q = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pdt)
    self.k = param(rngs, init, (d, kh, hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.v = param(rngs, init, (d, kh, hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.o = param(rngs, out_init, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
    self.qkv_bias, self.out_bias = cfg.qkv_bias, cfg.out_bias
    zeros = nnx.initializers.zeros
    if cfg.qkv_bias:
      self.q_bias = param(rngs, zeros, (h, hd), ("heads", "head_dim"), pdt)
      self.k_bias = param(rngs, zeros, (kh, hd), ("kv_heads", "head_dim"), pdt)
      self.v_bias = param(rngs, zeros, (kh, hd), ("kv_heads", "head_dim"), pdt)
    if cfg.out_bias:
      self.o_bias = param(rngs, zeros, (d,), ("norm",), pdt)

  def _project(self, x, kernel, bias, heads_axis):
    y = dense(x, kernel[...].astype(self.dtype))
    if bias is not None:
      y = y + bias[...].astype(self.dtype)
    return constrain(y, ("batch", "length", heads_axis, "act_head_dim"))

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: kv_cache.KVCache | None = None):
    """x `[batch, length, d_model]` -> `[batch, length, d_model]`; with `cache` (this layer's
    slice) -> `(y, (k_new, v_new))`, see `_cached_call`."""
    if cache is not None:
      return self._cached_call(x, positions=positions, segment_ids=segment_ids, cache=cache)
    bias = lambda name: getattr(self, name) if self.qkv_bias else None
    q = self._project(x, self.q, bias("q_bias"), "act_heads")
    k = self._project(x, self.k, bias("k_bias"), "act_kv_heads")
    v = self._project(x, self.v, bias("v_bias"), "act_kv_heads")
    if self.use_rope:
      cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, self.rope_scaling)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scale = 1.0 / math.sqrt(self.head_dim)
    if self.impl == "dense":
      out = dense_attention(q, k, v, segment_mask(segment_ids, segment_ids, causal=self.causal,
                                                  window=self.window), scale)
    elif self.impl in ("auto", "blockwise"):
      out = flash_attention(q, k, v, segment_ids, scale, causal=self.causal, block=self.block,
                            window=self.window)
    else:
      raise ValueError(f"config.model.attention: unknown {self.impl!r} (auto | dense | blockwise)")
    # Padding rows attend nowhere: zero them rather than keep the uniform average.
    out = out * (segment_ids > 0)[:, :, None, None].astype(out.dtype)
    out = constrain(out, ("batch", "length", "act_heads", "act_head_dim"))
    y = dense(out, self.o[...].astype(self.dtype), in_dims=2)
    if self.out_bias:
      y = y + self.o_bias[...].astype(self.dtype)
    return y

  def _cached_call(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                   cache: kv_cache.KVCache):
    """Attention of new tokens over a KV cache (prefill: many tokens, decode: one per row).

    Args:
      x: `[batch, new_len, d_model]`, the tokens after those in `cache`.
      positions, segment_ids: `[batch, new_len]` of those tokens.
      cache: this layer's slice of the cache before them (models/kv_cache.py).
    Returns:
      `(y [batch, new_len, d_model], (k_new, v_new))`: the caller stores the new keys / values
      `[batch, new_len, kv_heads, head_dim]` (`kv_cache.append`, once for all layers).
    """
    if not self.causal:
      raise ValueError("a KV cache serves causal attention only (decoders)")
    bias = lambda name: getattr(self, name) if self.qkv_bias else None
    q = self._project(x, self.q, bias("q_bias"), "act_heads")
    k = self._project(x, self.k, bias("k_bias"), "act_kv_heads")
    v = self._project(x, self.v, bias("v_bias"), "act_kv_heads")
    if self.use_rope:
      cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, self.rope_scaling)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = kv_cache.attend(q, k, v, segment_ids, cache, 1.0 / math.sqrt(self.head_dim),
                          window=self.window)
    out = out * (segment_ids > 0)[:, :, None, None].astype(out.dtype)
    out = constrain(out, ("batch", "length", "act_heads", "act_head_dim"))
    y = jnp.einsum("blhk,hkd->bld", out, self.o[...].astype(self.dtype))
    if self.out_bias:
      y = y + self.o_bias[...].astype(self.dtype)
    return y, (k, v)

"""Multi-head / grouped-query self-attention over packed rows.

Packing contract: `segment_ids [batch, length]` numbers the documents of a row 1, 2, ...; 0 is
padding. A token attends to earlier-or-equal tokens of its own segment only; padding attends
nowhere (its output is zero). `positions [batch, length]` restart at 0 in every segment and feed
the rotary embedding, so a packed document is computed exactly as if it were alone.

The softmax itself is one of several kernels (config.model.attention), all computing
`dense_attention`'s result: `attend` runs the one models/attention_kernels.py resolves for the
layer and the platform the step is traced for.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import kv_cache
from models.attention_kernels import (Layer, decode_kernel, resolve_kernel, run_per_device,
                                     step_platform)
# MASK_VALUE: large negative instead of -inf, so a fully masked (padding) row softmaxes to a
# finite uniform distribution instead of NaN (and is zeroed afterwards).
from models.flash_attention import (  # noqa: F401 (segment_mask re-exported)
    MASK_VALUE, flash_attention, segment_mask)
from models.gpu_attention import cudnn_attention, pallas_gpu_attention
from models.layers import (RMSNorm, apply_rope, dense, dtype_of, join_outputs, matrix,
                           param, rope_scaling_of, rope_tables)
from models.quantize import Int8Weight
from models.splash_attention import splash_attention
from parallel.rules import constrain


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    scale: float, softcap: float = 0.0) -> jax.Array:
  """Softmax attention with grouped KV heads.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k, v: `[batch, kv_len, kv_heads, head_dim]`; heads is a multiple of kv_heads.
    mask: `[batch, q_len, kv_len]` boolean, True where attention is allowed.
    scale: multiplier of the logits (1/sqrt(head_dim)).
    softcap: c > 0 caps the scaled logits to c * tanh(logits / c) (Gemma 2); 0: none.
  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype.
  """
  b, lq, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, lq, kh, h // kh, d)
  logits = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32) * scale
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
  return out.reshape(b, lq, h, d)


def attend(kernel: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
           scale: float, *, causal: bool, window: int = 0, block: int = 128,
           kernel_block: int = 0, interpret: bool = False, softcap: float = 0.0) -> jax.Array:
  """Softmax attention within segments by `kernel` (a resolved name, not 'auto').

  Args:
    kernel: 'dense' | 'blockwise' | 'splash' | 'cudnn' | 'pallas_gpu'
      (models/attention_kernels.py).
    q: `[batch, length, heads, head_dim]`.
    k, v: `[batch, length, kv_heads, head_dim]`.
    segment_ids: `[batch, length]` int, 0 = padding.
    scale: multiplier of the logits.
    causal: attend to keys at or before the query only.
    window: causal sliding window (a query sees its last `window` tokens); 0: none.
    block: blockwise query / key block rows (config.model.attention_block).
    kernel_block: Pallas tile rows (config.model.attention_kernel_block; 0: the kernel's).
    interpret: run a Pallas kernel in Pallas's interpreter (tests on CPU).
    softcap: attention-logit soft-capping c (Gemma 2); 0: none. Dense and blockwise only
      (models/attention_kernels.py refuses the others at config time).
  Returns:
    `[batch, length, heads, head_dim]`; padding queries' rows are unspecified.
  """
  if kernel == "dense":
    mask = segment_mask(segment_ids, segment_ids, causal=causal, window=window)
    return dense_attention(q, k, v, mask, scale, softcap)
  if kernel == "blockwise":
    return flash_attention(q, k, v, segment_ids, scale, causal=causal, block=block,
                           window=window, softcap=softcap)
  if softcap:
    raise ValueError(f"config.model.attention {kernel!r} has no attention-logit soft-capping")
  if kernel == "splash":
    fn = functools.partial(splash_attention, scale=scale, causal=causal, window=window,
                           block=kernel_block, interpret=interpret)
  elif kernel == "cudnn":
    fn = functools.partial(cudnn_attention, scale=scale, causal=causal, window=window)
  elif kernel == "pallas_gpu":
    fn = functools.partial(pallas_gpu_attention, scale=scale, causal=causal,
                           block=kernel_block, interpret=interpret)
  else:
    raise ValueError(f"config.model.attention: no kernel {kernel!r}")
  return run_per_device(fn, q, k, v, segment_ids)


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
    self.kernel_block = cfg.get("attention_kernel_block", 0) or 0
    self.window = cfg.get("sliding_window", 0) or 0
    # Gemma: logits scaled by query_pre_attn_scalar**-0.5 (0: head_dim's), soft-capped at c.
    self.scale = (cfg.get("query_pre_attn_scalar", 0) or hd) ** -0.5
    self.softcap = float(cfg.get("attn_softcap", 0.0) or 0.0)
    self.rope_local_theta = float(cfg.get("rope_local_theta", 0.0) or 0.0)
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
    # Qwen3 / Gemma 3: RMSNorm over each head's q and k (weight [head_dim]), before RoPE.
    self.qk_norm = bool(cfg.get("qk_norm", False))
    if self.qk_norm:
      self.q_norm = RMSNorm(hd, cfg, rngs=rngs)
      self.k_norm = RMSNorm(hd, cfg, rngs=rngs)

  def _project(self, x, kernel, bias, heads_axis):
    y = dense(x, matrix(kernel, self.dtype))
    if bias is not None:
      y = y + bias[...].astype(self.dtype)
    return constrain(y, ("batch", "length", heads_axis, "act_head_dim"))

  def joined_kernel(self) -> jax.Array | Int8Weight:
    """q, k and v as one `[d, (heads + 2 kv_heads) * head_dim]` matrix (`join_outputs`), for
    `use_joined`."""
    return join_outputs([matrix(p, self.dtype) for p in (self.q, self.k, self.v)])

  def use_joined(self, kernel: jax.Array | Int8Weight) -> None:
    """Sampling: compute q, k and v by one product with `joined_kernel()`'s matrix, made once
    outside the decode loop (models/decoder.py `BlockStack.unroll`)."""
    self.joined = nnx.data(kernel)

  def _project_qkv(self, x, bias):
    """(q, k, v) of `x`: three products, or one with the joined kernel (`use_joined`)."""
    joined = getattr(self, "joined", None)
    if joined is None:
      return (self._project(x, self.q, bias("q_bias"), "act_heads"),
              self._project(x, self.k, bias("k_bias"), "act_kv_heads"),
              self._project(x, self.v, bias("v_bias"), "act_kv_heads"))
    h, kh, hd = self.num_heads, self.num_kv_heads, self.head_dim
    y = dense(x, joined)
    parts = jnp.split(y, [h * hd, (h + kh) * hd], axis=-1)
    out = []
    for part, heads, name, axis in zip(parts, (h, kh, kh), ("q_bias", "k_bias", "v_bias"),
                                       ("act_heads", "act_kv_heads", "act_kv_heads")):
      part = part.reshape(*x.shape[:-1], heads, hd)
      if bias(name) is not None:
        part = part + bias(name)[...].astype(self.dtype)
      out.append(constrain(part, ("batch", "length", axis, "act_head_dim")))
    return tuple(out)

  def layer_settings(self, local: bool | None):
    """(window, rope theta, rope scaling) of a layer of kind `local` (models/layer_pattern.py):
    None, every layer alike (the config's window and RoPE); True, a local layer (the window,
    the local RoPE base unscaled, if set); False, a global layer (no window)."""
    if local is None:
      return self.window, self.rope_theta, self.rope_scaling
    if not local:
      return 0, self.rope_theta, self.rope_scaling
    if self.rope_local_theta:
      return self.window, self.rope_local_theta, None
    return self.window, self.rope_theta, self.rope_scaling

  def _rope(self, q, k, positions, theta, scaling):
    if not self.use_rope:
      return q, k
    cos, sin = rope_tables(positions, self.head_dim, theta, scaling)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: kv_cache.KVCache | None = None, local: bool | None = None):
    """x `[batch, length, d_model]` -> `[batch, length, d_model]`; with `cache` (this layer's
    slice) -> `(y, (k_new, v_new))`, see `_cached_call`. `local`: see `layer_settings`."""
    if cache is not None:
      return self._cached_call(x, positions=positions, segment_ids=segment_ids, cache=cache,
                               local=local)
    window, theta, scaling = self.layer_settings(local)
    bias = lambda name: getattr(self, name) if self.qkv_bias else None
    q = self._project(x, self.q, bias("q_bias"), "act_heads")
    k = self._project(x, self.k, bias("k_bias"), "act_kv_heads")
    v = self._project(x, self.v, bias("v_bias"), "act_kv_heads")
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = self._rope(q, k, positions, theta, scaling)
    layer = Layer(causal=self.causal, window=window, head_dim=self.head_dim,
                  dtype=jnp.dtype(self.dtype).name, kernel_block=self.kernel_block,
                  softcap=self.softcap)
    kernel = resolve_kernel(self.impl, layer, step_platform())
    out = attend(kernel, q, k, v, segment_ids, self.scale, causal=self.causal, window=window,
                 block=self.block, kernel_block=self.kernel_block, softcap=self.softcap)
    # Padding rows attend nowhere: zero them rather than keep the uniform average.
    out = out * (segment_ids > 0)[:, :, None, None].astype(out.dtype)
    out = constrain(out, ("batch", "length", "act_heads", "act_head_dim"))
    y = dense(out, matrix(self.o, self.dtype), in_dims=2)
    if self.out_bias:
      y = y + self.o_bias[...].astype(self.dtype)
    return y

  def _cached_call(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                   cache: kv_cache.KVCache, local: bool | None = None):
    """Attention of new tokens over a KV cache (prefill: many tokens, decode: one per row).

    Args:
      x: `[batch, new_len, d_model]`, the tokens after those in `cache`.
      positions, segment_ids: `[batch, new_len]` of those tokens.
      cache: this layer's slice of the cache before them (models/kv_cache.py).
      local: this layer's kind (`layer_settings`).
    Returns:
      `(y [batch, new_len, d_model], (k_new, v_new))`: the caller stores the new keys / values
      `[batch, new_len, kv_heads, head_dim]` (`kv_cache.append`, once for all layers).
    """
    if not self.causal:
      raise ValueError("a KV cache serves causal attention only (decoders)")
    window, theta, scaling = self.layer_settings(local)
    # The GPU decode kernel reads its layer in place from the stacked cache (an unrolled
    # stack hands it over with `cache.layer`); a scanned layer's slice would be copied first.
    decode = x.shape[1] == 1 and cache.layer is not None
    kernel = lambda joined: decode and decode_kernel(
        head_dim=self.head_dim, heads=self.num_heads, kv_heads=self.num_kv_heads,
        cache_len=cache.k.shape[-2], batch=x.shape[0], joined=joined)
    joined = getattr(self, "joined", None)
    if joined is not None and self.use_rope and not self.qk_norm and kernel(True):
      # One product and the kernel: it splits q / k / v and applies RoPE itself.
      y = dense(x, joined)
      if self.qkv_bias:
        y = y + jnp.concatenate([getattr(self, n)[...].reshape(-1) for n in
                                 ("q_bias", "k_bias", "v_bias")]).astype(self.dtype)
      cos, sin = rope_tables(positions, self.head_dim, theta, scaling)
      out, k, v = kv_cache.attend_joined(
          y, cos, sin, segment_ids, cache, self.scale, heads=self.num_heads,
          kv_heads=self.num_kv_heads, window=window, softcap=self.softcap)
    else:
      bias = lambda name: getattr(self, name) if self.qkv_bias else None
      q, k, v = self._project_qkv(x, bias)
      if self.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
      q, k = self._rope(q, k, positions, theta, scaling)
      out = kv_cache.attend(q, k, v, segment_ids, cache, self.scale, window=window,
                            softcap=self.softcap, kernel=kernel(False))
    out = out * (segment_ids > 0)[:, :, None, None].astype(out.dtype)
    out = constrain(out, ("batch", "length", "act_heads", "act_head_dim"))
    y = dense(out, matrix(self.o, self.dtype), in_dims=2)
    if self.out_bias:
      y = y + self.o_bias[...].astype(self.dtype)
    return y, (k, v)

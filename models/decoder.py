"""One decoder-only transformer covering LLaMA / Qwen2 / Mistral / GPT-2 style models by config.

    tokens -> embed (+ learned positions) -> N x [x + attn(norm(x)); x + mlp(norm(x))]
           -> final norm -> hidden states -> lm head (or tied embedding) -> logits

Style switches (config.model): norm rmsnorm|layernorm, position rope|learned, activation
swiglu|geglu|gelu, num_kv_heads < num_heads for GQA, qkv_bias (Qwen2), out_bias/mlp_bias (GPT-2),
tie_embeddings; Gemma 2 / 3 add scaled embeddings, (1 + w) RMSNorm, sandwich norms (a second
norm on each sub-layer's output), soft-capped logits and local / global layer patterns
(models/layer_pattern.py). With `scan_layers` the blocks are one stacked module run by
`jax.lax.scan`, so compile time does not grow with depth; `remat` picks what the backward pass
recomputes.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import decode_gemm, kv_cache
from models import moe as moe_lib
from models.attention import Attention
from models.layer_pattern import layer_kinds, scan_layers
from models.layers import MLP, dense, dtype_of, make_norm, matrix, param
from models.quantize import Int8Weight
from parallel.rules import constrain

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs (no batch dims: the projections), recompute attention and elementwise.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, causal: bool = True):
    self.attn_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.attn.causal = causal
    self.mlp_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    # Mixture of experts (models/moe.py) in place of the dense MLP when num_experts > 0.
    self.moe = bool(cfg.get("num_experts", 0))
    self.mlp = moe_lib.MoE(cfg, rngs=rngs) if self.moe else MLP(cfg, rngs=rngs)
    # Gemma 2 / 3 sandwich norms: the attention and MLP outputs are normed again before the
    # residual add (HF's post_attention_layernorm / post_feedforward_layernorm).
    self.sandwich = bool(cfg.get("sandwich_norms", False))
    if self.sandwich:
      self.post_attn_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
      self.post_mlp_norm = make_norm(cfg.d_model, cfg, rngs=rngs)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: kv_cache.KVCache | None = None, local: bool | None = None):
    """x -> x; with `cache` (this layer's slice) -> `(x, (k_new, v_new))` (see Attention).
    `local`: this layer's kind in a local / global pattern (models/layer_pattern.py)."""
    if cache is None:
      attn = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids,
                       local=local)
    else:
      attn, new_kv = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids,
                               cache=cache, local=local)
    x = x + (self.post_attn_norm(attn) if self.sandwich else attn)
    x = constrain(x, ("batch", "length", "act_embed"))
    h = self.mlp_norm(x)
    h = self.mlp(h, valid=segment_ids > 0) if self.moe else self.mlp(h)
    x = x + (self.post_mlp_norm(h) if self.sandwich else h)
    x = constrain(x, ("batch", "length", "act_embed"))
    return x if cache is None else (x, new_kv)


def _kind(local: bool | None) -> dict:
  """A block's `local` keyword, only in a patterned stack (encoder blocks take none)."""
  return {} if local is None else dict(local=local)


class BlockStack(nnx.Module):
  """`num_layers` blocks, stacked along a leading `layers` axis (scan) or kept as a list."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, causal: bool = True,
               block_cls: type | None = None):
    """`block_cls`: the block class (default `Block`; the BERT encoder passes its post-norm
    block, which has the same parameters)."""
    block_cls = block_cls or Block
    if cfg.remat not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat: unknown {cfg.remat!r} ({' | '.join(REMAT_POLICIES)})")
    self.remat = cfg.remat
    self.scan = cfg.scan_layers
    # Static per-layer kinds (local / global) and the pattern's period; None: all alike.
    self.kinds = layer_kinds(cfg)
    self.period = int(cfg.get("sliding_window_pattern", 0) or 0)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_stack(rngs):
        return block_cls(cfg, rngs=rngs, causal=causal)
      self.layers = make_stack(rngs)
    else:
      self.layers = nnx.List([block_cls(cfg, rngs=rngs, causal=causal)
                              for _ in range(cfg.num_layers)])

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: kv_cache.KVCache | None = None):
    """x -> x; with a stacked `cache` -> `(x, cache)` updated by the new tokens."""
    if cache is not None:
      return self._cached_call(x, positions=positions, segment_ids=segment_ids, cache=cache)

    def apply_block(h, graphdef, state, local):
      # -> (h, this block's MoE aux losses, {} for a dense block), taken out of the block
      # here: a block merged inside the scan / remat is gone after it.
      block = nnx.merge(graphdef, state)
      h = block(h, positions=positions, segment_ids=segment_ids, **_kind(local))
      return h, moe_lib.pop_aux(block)

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      apply_block = jax.checkpoint(apply_block, policy=policy, prevent_cse=not self.scan,
                                   static_argnums=(1, 3))
    if self.scan:
      graphdef, state = nnx.split(self.layers)
      x, aux = scan_layers(lambda h, s, local: apply_block(h, graphdef, s, local), x, state,
                           self.kinds, self.period)
    else:
      per_layer = []
      for i, block in enumerate(self.layers):
        graphdef, state = nnx.split(block)
        x, layer_aux = apply_block(x, graphdef, state, self.kinds and self.kinds[i])
        per_layer.append(layer_aux)
      aux = jax.tree.map(lambda *v: jnp.stack(v), *per_layer) if per_layer[0] else {}
    if aux:  # MoE: the mean over layers, read by models/moe.py `pop_aux`
      self.moe_aux = nnx.Intermediate(jax.tree.map(jnp.mean, aux))
    return x

  def unroll(self, join: bool = False) -> None:
    """Sampling: from now on a cached call runs the layers unrolled, each from its own
    arrays, sliced out of the stack here, once.

    The sampler calls this between the prefill and the decode loop (models/sampler.py), so
    the slices are taken once per call, outside the loop. A scanned decode step instead slices
    every layer's weights out of the stack each step, and XLA:GPU copies each slice into a new
    buffer before its GEMM: the step then moves every weight three times, not once.

    `join`: also join each layer's q, k, v kernels into one matrix and its gate and up into
    another, here, so that a decode step runs four GEMMs a layer instead of seven, each over
    more columns (the concatenation XLA's dot merger would make inside the loop, every step).
    Only where the heads and the MLP dimension are not sharded: the joined outputs must split
    back into q, k, v and gate, up on every device alike.
    """
    if getattr(self, "unrolled", None) is not None:
      return
    if self.scan:
      graphdef, state = nnx.split(self.layers)
      states = [jax.tree.map(lambda a, i=i: a[i], state)
                for i in range(jax.tree.leaves(state)[0].shape[0])]
      parts = [(graphdef, s) for s in states]
    else:
      parts = [nnx.split(block) for block in self.layers]
    joined = []
    for graphdef, state in parts if join else ():
      block = nnx.merge(graphdef, state)
      joined.append(dict(attn=block.attn.joined_kernel(),
                         mlp=None if block.moe else block.mlp.joined_kernel()))
    # States, not modules: each call merges its blocks anew (`_cached_call`).
    self.unrolled_graphdefs = tuple(graphdef for graphdef, _ in parts)
    self.unrolled = nnx.data([state for _, state in parts])
    self.joined = nnx.data(joined)

  def _cached_call(self, x, *, positions, segment_ids, cache: kv_cache.KVCache):
    # Inference only, so no remat. Layers only read their cache slice and hand back the new
    # tokens' keys / values; one write after the last layer updates the big loop-carried
    # buffers in place (see models/kv_cache.py).
    def layer(h, block, k, v, local, index=None):
      # `index`: k, v are the stacked buffers and this is the layer to read (KVCache.layer).
      out = block(h, positions=positions, segment_ids=segment_ids,
                  cache=cache._replace(k=k, v=v, layer=index), **_kind(local))
      moe_lib.pop_aux(block)  # routing losses serve training only
      return out

    unrolled = getattr(self, "unrolled", None)
    joined = getattr(self, "joined", None) or ()
    if self.scan and unrolled is None:
      graphdef, state = nnx.split(self.layers)
      def body(h, xs, local):
        layer_state, k, v = xs
        return layer(h, nnx.merge(graphdef, layer_state), k, v, local)
      x, (k_new, v_new) = scan_layers(body, x, (state, cache.k, cache.v), self.kinds,
                                      self.period)
    else:
      news = []
      # Each block merged anew, in this trace: in the sampler's decode loop a block made
      # outside it could not store an MoE layer's routing losses.
      parts = ([nnx.split(b) for b in self.layers] if unrolled is None
               else list(zip(self.unrolled_graphdefs, unrolled)))
      for i, (graphdef, state) in enumerate(parts):
        block = nnx.merge(graphdef, state)
        if joined:
          block.attn.use_joined(joined[i]["attn"])
          if joined[i]["mlp"] is not None:
            block.mlp.use_joined(joined[i]["mlp"])
        x, kv = layer(x, block, cache.k, cache.v, self.kinds and self.kinds[i], index=i)
        news.append(kv)
      k_new, v_new = (jnp.stack(per_layer) for per_layer in zip(*news))
    return x, kv_cache.append(cache, k_new, v_new, segment_ids)


def unroll_layers(model: nnx.Module, join: bool = False) -> None:
  """`BlockStack.unroll(join)` on every layer stack of `model` (a decoder, or a module
  holding one)."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, BlockStack):
      node.unroll(join)


class Decoder(nnx.Module):
  """Decoder-only LM. `__call__` gives logits; `hidden_states` serves reward / value heads."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype_of(cfg.dtype)
    pdt = dtype_of(cfg.param_dtype)
    init = nnx.initializers.normal(cfg.init_std)
    if cfg.position not in ("rope", "learned"):
      raise ValueError(f"config.model.position: unknown {cfg.position!r} (rope | learned)")
    self.embed = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
    if cfg.position == "learned":
      self.pos_embed = param(rngs, init, (cfg.max_length, cfg.d_model), ("max_length", "embed"),
                             pdt)
    self.blocks = BlockStack(cfg, rngs=rngs, causal=True)
    self.final_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                    cache: kv_cache.KVCache | None = None):
    """tokens `[batch, length]` int -> final-norm hidden states `[batch, length, d_model]`.

    With `cache` (models/kv_cache.py) the tokens fill its next slots and attend to everything
    cached before them; returns `(hidden, updated cache)`.
    """
    # Gather the table's feature dim first (as FSDP does for every weight) so the lookup's
    # output comes out batch-sharded instead of feature-sharded.
    table = self.embed.get_value()
    if isinstance(table, Int8Weight):  # sampling with int8 weights: only the rows read
      x = table.take_rows(tokens)
    else:
      table = constrain(table, ("vocab", None))
      x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    if self.config.get("scale_embeddings", False):
      # Gemma: times sqrt(d_model) rounded to the compute dtype, as HF multiplies (in bfloat16
      # sqrt(3072) = 55.43 is 55.5).
      x = x * jnp.asarray(math.sqrt(self.config.d_model), self.dtype)
    if self.config.position == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    if cache is not None:
      x, cache = self.blocks(x, positions=positions, segment_ids=segment_ids, cache=cache)
      return self.final_norm(x), cache
    x = self.blocks(x, positions=positions, segment_ids=segment_ids)
    return self.final_norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden `[batch, length, d_model]` -> float32 logits `[batch, length, vocab]`."""
    # 2-D products (see layers.dense): the [tokens, vocab] gradient then feeds plain GEMMs.
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if self.config.tie_embeddings:
      w = matrix(self.embed, self.dtype)
      int8 = isinstance(w, Int8Weight)
      # In a decode step that asked for it, models/decode_gemm.py's kernel (None: XLA's).
      out = decode_gemm.maybe_dot(h2, w.q if int8 else w, w.output_scale() if int8 else None,
                                  out_dtype=jnp.float32, transposed=True)
      if out is None and int8:  # (h @ q^T) * the table's row scales
        out = jnp.einsum("td,vd->tv", h2, w.values(self.dtype),
                         preferred_element_type=jnp.float32) * w.output_scale()
      elif out is None:
        out = jnp.einsum("td,vd->tv", h2, w, preferred_element_type=jnp.float32)
    else:
      out = dense(h2, matrix(self.lm_head, self.dtype), preferred_element_type=jnp.float32)
    cap = self.config.get("final_softcap", 0.0)
    if cap:  # Gemma 2: c * tanh(logits / c) bounds the logits to (-c, c)
      out = cap * jnp.tanh(out / cap)
    return constrain(out.reshape(*lead, -1), ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: kv_cache.KVCache | None = None):
    """Logits `[batch, length, vocab]`; with `cache` -> `(logits, updated cache)`."""
    if cache is not None:
      hidden, cache = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids,
                                         cache=cache)
      return self.logits(hidden), cache
    return self.logits(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

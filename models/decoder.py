"""One decoder-only transformer covering LLaMA / Qwen2 / Mistral / GPT-2 style models by config.

    tokens -> embed (+ learned positions) -> N x [x + attn(norm(x)); x + mlp(norm(x))]
           -> final norm -> hidden states -> lm head (or tied embedding) -> logits

Style switches (config.model): norm rmsnorm|layernorm, position rope|learned, activation
swiglu|gelu, num_kv_heads < num_heads for GQA, qkv_bias (Qwen2), out_bias/mlp_bias (GPT-2),
tie_embeddings. With `scan_layers` the blocks are one stacked module run by `jax.lax.scan`, so
compile time does not grow with depth; `remat` picks what the backward pass recomputes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.attention import Attention
from models.layers import MLP, dtype_of, make_norm, param
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
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("batch", "length", "act_embed"))


class BlockStack(nnx.Module):
  """`num_layers` blocks, stacked along a leading `layers` axis (scan) or kept as a list."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, causal: bool = True):
    if cfg.remat not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat: unknown {cfg.remat!r} ({' | '.join(REMAT_POLICIES)})")
    self.remat = cfg.remat
    self.scan = cfg.scan_layers
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_stack(rngs):
        return Block(cfg, rngs=rngs, causal=causal)
      self.layers = make_stack(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs, causal=causal)
                              for _ in range(cfg.num_layers)])

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    def apply_block(h, graphdef, state):
      return nnx.merge(graphdef, state)(h, positions=positions, segment_ids=segment_ids)

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      apply_block = jax.checkpoint(apply_block, policy=policy, prevent_cse=not self.scan,
                                   static_argnums=(1,))
    if self.scan:
      graphdef, state = nnx.split(self.layers)
      x, _ = jax.lax.scan(lambda h, s: (apply_block(h, graphdef, s), None), x, state)
      return x
    for block in self.layers:
      graphdef, state = nnx.split(block)
      x = apply_block(x, graphdef, state)
    return x


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

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array,
                    segment_ids: jax.Array) -> jax.Array:
    """tokens `[batch, length]` int -> final-norm hidden states `[batch, length, d_model]`."""
    # Gather the table's feature dim first (as FSDP does for every weight) so the lookup's
    # output comes out batch-sharded instead of feature-sharded.
    table = constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    if self.config.position == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = self.blocks(x, positions=positions, segment_ids=segment_ids)
    return self.final_norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden `[batch, length, d_model]` -> float32 logits `[batch, length, vocab]`."""
    if self.config.tie_embeddings:
      w = self.embed[...].astype(self.dtype)
      out = jnp.einsum("bld,vd->blv", hidden, w, preferred_element_type=jnp.float32)
    else:
      w = self.lm_head[...].astype(self.dtype)
      out = jnp.einsum("bld,dv->blv", hidden, w, preferred_element_type=jnp.float32)
    return constrain(out, ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    return self.logits(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

"""A BERT-style bidirectional encoder for masked-language-model pretraining.

    tokens -> embed (+ learned positions) (+ token types) (-> embed norm)
           -> N x block -> (final norm) -> hidden states
           -> MLM head: norm(act(hidden W + b)) . embed^T + output_bias -> logits

    block, pre-norm (default):  x = x + attn(norm(x));  x = x + mlp(norm(x))
    block, post-norm (BERT):    x = norm(x + attn(x));  x = norm(x + mlp(x))

The pre-norm body is the decoder's (models/decoder.py `BlockStack`, the same attention, norms
and MLPs, so every style switch of config.model applies), built with `causal=False`: a token
attends to every token of its own segment, before and after it. Packing still isolates
documents through `segment_ids`, and padding attends nowhere.

BERT (Devlin et al., 2019) is the post-norm variant of the original Transformer (Vaswani et
al., 2017): `norm_position="post"` puts each norm after its residual add (same params,
`attn_norm` / `mlp_norm`), and the last block's norm is the final one (no `final_norm`).
`embed_norm` normalises word + position + token-type embeddings; `type_vocab_size` > 0 adds
token-type (segment A / B) embeddings, type 0 unless the caller passes `token_type_ids`.

The prediction head is BERT's (`get_masked_lm_output` in its released run_pretraining.py): a
dense d_model -> d_model transform with an activation (GELU, or SiLU for SwiGLU configs), a
norm, then the output projection *tied to the input embedding* plus a per-token output bias.
Tying is always on here, whatever `config.model.tie_embeddings` says: it is how BERT, RoBERTa
and ALBERT share the vocabulary matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import kv_cache
from models.decoder import Block, BlockStack
from models.layers import dtype_of, make_norm, param
from parallel.rules import constrain

NORM_POSITIONS = ("pre", "post")


class PostNormBlock(Block):
  """BERT's block: x = norm(x + attn(x)); x = norm(x + mlp(x)). The params are the pre-norm
  block's, so conversion tables and sharding rules treat both alike."""

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               cache: kv_cache.KVCache | None = None) -> jax.Array:
    if cache is not None:
      raise ValueError("a KV cache serves causal attention only (decoders)")
    x = self.attn_norm(x + self.attn(x, positions=positions, segment_ids=segment_ids))
    x = constrain(x, ("batch", "length", "act_embed"))
    x = self.mlp_norm(x + self.mlp(x))
    return constrain(x, ("batch", "length", "act_embed"))


class Encoder(nnx.Module):
  """Bidirectional encoder. `__call__` gives MLM logits; `hidden_states` serves other heads."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype_of(cfg.dtype)
    pdt = dtype_of(cfg.param_dtype)
    init = nnx.initializers.normal(cfg.init_std)
    zeros = nnx.initializers.zeros
    if cfg.position not in ("rope", "learned"):
      raise ValueError(f"config.model.position: unknown {cfg.position!r} (rope | learned)")
    # `.get`: run configs written before these fields existed build the pre-norm encoder.
    norm_position = cfg.get("norm_position", "pre")
    if norm_position not in NORM_POSITIONS:
      raise ValueError(f"config.model.norm_position: unknown {norm_position!r} (pre | post)")
    self.post_norm = norm_position == "post"
    self.type_vocab_size = int(cfg.get("type_vocab_size", 0))
    self.gelu_approximate = cfg.get("gelu_approximate", True)
    self.embed = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
    if cfg.position == "learned":
      self.pos_embed = param(rngs, init, (cfg.max_length, cfg.d_model), ("max_length", "embed"),
                             pdt)
    if self.type_vocab_size:
      # A handful of rows, looked up like the position table and replicated like it.
      self.type_embed = param(rngs, init, (self.type_vocab_size, cfg.d_model),
                              ("max_length", "embed"), pdt)
    if cfg.get("embed_norm", False):
      self.embed_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    if self.post_norm:
      self.blocks = BlockStack(cfg, rngs=rngs, causal=False, block_cls=PostNormBlock)
    else:
      self.blocks = BlockStack(cfg, rngs=rngs, causal=False)
      self.final_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    # MLM head. The square transform is named like an MLP projection ('embed' in, 'mlp' out):
    # one logical name cannot take both dims, as one mesh axis cannot shard both.
    self.head_dense = param(rngs, init, (cfg.d_model, cfg.d_model), ("embed", "mlp"), pdt)
    self.head_bias = param(rngs, zeros, (cfg.d_model,), ("norm",), pdt)
    self.head_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    self.output_bias = param(rngs, zeros, (cfg.vocab_size,), ("vocab",), pdt)

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                    token_type_ids: jax.Array | None = None) -> jax.Array:
    """Final hidden states `[batch, length, d_model]`.

    Args:
      tokens, positions, segment_ids: `[batch, length]` int (see models/attention.py).
      token_type_ids: `[batch, length]` int < type_vocab_size, or None: all type 0 (our
        packed batches carry no sentence pairs). Ignored without token-type embeddings.
    """
    table = constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    if self.config.position == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
    if self.type_vocab_size:
      if token_type_ids is None:
        x = x + self.type_embed[0].astype(self.dtype)
      else:
        x = x + jnp.take(self.type_embed[...], token_type_ids, axis=0).astype(self.dtype)
    if hasattr(self, "embed_norm"):
      x = self.embed_norm(x)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = self.blocks(x, positions=positions, segment_ids=segment_ids)
    return x if self.post_norm else self.final_norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden `[batch, length, d_model]` -> float32 MLM logits `[batch, length, vocab]`."""
    h = jnp.einsum("bld,de->ble", hidden, self.head_dense[...].astype(self.dtype))
    h = h + self.head_bias[...].astype(self.dtype)
    if self.config.activation == "gelu":
      h = jax.nn.gelu(h, approximate=self.gelu_approximate)
    else:
      h = jax.nn.silu(h)
    h = self.head_norm(constrain(h, ("batch", "length", "act_embed")))
    w = self.embed[...].astype(self.dtype)
    out = jnp.einsum("bld,vd->blv", h, w, preferred_element_type=jnp.float32)
    out = out + self.output_bias[...].astype(jnp.float32)
    return constrain(out, ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """MLM logits `[batch, length, vocab]` (float32); arguments as in `hidden_states`."""
    return self.logits(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids,
                                          token_type_ids=token_type_ids))

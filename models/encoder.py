"""A BERT-style bidirectional encoder for masked-language-model pretraining.

    tokens -> embed (+ learned positions) -> N x [x + attn(norm(x)); x + mlp(norm(x))]
           -> final norm -> hidden states
           -> MLM head: norm(act(hidden W + b)) . embed^T + output_bias -> logits

The body is the decoder's (models/decoder.py `BlockStack`, the same attention, norms and MLPs,
so every style switch of config.model applies), built with `causal=False`: a token attends to
every token of its own segment, before and after it. Packing still isolates documents through
`segment_ids`, and padding attends nowhere.

The prediction head is BERT's (Devlin et al., 2019; `get_masked_lm_output` in its released
run_pretraining.py): a dense d_model -> d_model transform with an activation (GELU, or SiLU
for SwiGLU configs), a norm, then the output projection *tied to the input embedding* plus a
per-token output bias. Tying is always on here, whatever `config.model.tie_embeddings` says:
it is how BERT, RoBERTa and ALBERT share the vocabulary matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.decoder import BlockStack
from models.layers import dtype_of, make_norm, param
from parallel.rules import constrain


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
    self.embed = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
    if cfg.position == "learned":
      self.pos_embed = param(rngs, init, (cfg.max_length, cfg.d_model), ("max_length", "embed"),
                             pdt)
    self.blocks = BlockStack(cfg, rngs=rngs, causal=False)
    self.final_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    # MLM head. The square transform is named like an MLP projection ('embed' in, 'mlp' out):
    # one logical name cannot take both dims, as one mesh axis cannot shard both.
    self.head_dense = param(rngs, init, (cfg.d_model, cfg.d_model), ("embed", "mlp"), pdt)
    self.head_bias = param(rngs, zeros, (cfg.d_model,), ("norm",), pdt)
    self.head_norm = make_norm(cfg.d_model, cfg, rngs=rngs)
    self.output_bias = param(rngs, zeros, (cfg.vocab_size,), ("vocab",), pdt)

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array,
                    segment_ids: jax.Array) -> jax.Array:
    """tokens `[batch, length]` int -> final-norm hidden states `[batch, length, d_model]`."""
    table = constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    if self.config.position == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = self.blocks(x, positions=positions, segment_ids=segment_ids)
    return self.final_norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden `[batch, length, d_model]` -> float32 MLM logits `[batch, length, vocab]`."""
    h = jnp.einsum("bld,de->ble", hidden, self.head_dense[...].astype(self.dtype))
    h = h + self.head_bias[...].astype(self.dtype)
    h = jax.nn.gelu(h, approximate=True) if self.config.activation == "gelu" else jax.nn.silu(h)
    h = self.head_norm(constrain(h, ("batch", "length", "act_embed")))
    w = self.embed[...].astype(self.dtype)
    out = jnp.einsum("bld,vd->blv", h, w, preferred_element_type=jnp.float32)
    out = out + self.output_bias[...].astype(jnp.float32)
    return constrain(out, ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    return self.logits(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

"""Scalar heads on the decoder: reward models (and value models for PPO).

    tokens -> Decoder.hidden_states -> [batch, length, d_model] -> ScalarHead -> [batch, length]

`RewardModel` *is* a decoder (a subclass) whose LM head is replaced by a scalar head `score`,
so its parameter tree is a decoder's (`embed`, `blocks`, `final_norm`, ...) plus `score`: a
reward model starts from an SFT or pretrained decoder checkpoint by `config.init_from` (the
shared parameters are restored, `score` keeps its fresh init; training/checkpoint.py
`restore_params`), and a value model for PPO can start from a reward model the same way. The
untied `lm_head` is dropped, as a sequence-classification model drops it: it would cost
vocab x d_model parameters and optimizer state without ever getting a gradient.

The model returns a score at every token; a stage reads each sequence's reward at its last real
token (objectives/pairs.py `segment_last`), a value model uses every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.decoder import Decoder
from models.layers import dtype_of, param


class ScalarHead(nnx.Module):
  """hidden `[batch, length, d_model]` -> float32 `[batch, length]`: h . w (+ b).

  Params: `kernel` `[d_model, 1]` with logical axes ("embed", "score") and, with `bias`,
  `bias` `[1]` ("score",); `score` has a replicated rule in every preset of
  parallel/rules.py. Initialised like the decoder's projections (normal, init_std), so
  initial rewards are near 0.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, bias: bool = False):
    pdt = dtype_of(cfg.param_dtype)
    self.kernel = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model, 1),
                        ("embed", "score"), pdt)
    self.use_bias = bias
    if bias:
      self.bias = param(rngs, nnx.initializers.zeros, (1,), ("score",), pdt)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    # float32 accumulation: rewards are compared across sequences, where bf16 rounding
    # (~3 significant digits) would already decide close pairs.
    out = jnp.einsum("bld,do->blo", hidden, self.kernel[...].astype(hidden.dtype),
                     preferred_element_type=jnp.float32)[..., 0]
    if self.use_bias:
      out = out + self.bias[...].astype(jnp.float32)[0]
    return out


class RewardModel(Decoder):
  """A decoder with a scalar `score` head instead of its LM head (see the module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    if hasattr(self, "lm_head"):
      del self.lm_head
    self.score = ScalarHead(cfg, rngs=rngs)

  def logits(self, hidden: jax.Array) -> jax.Array:
    raise TypeError("a RewardModel has no LM head; call it for per-token scores")

  def __call__(self, tokens: jax.Array, *, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    """Per-token scores `[batch, length]` float32; a sequence's reward is the score at its
    last token (attention never crosses a segment, so packed sequences do not interact)."""
    return self.score(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

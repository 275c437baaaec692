"""Task heads on the decoder and the encoder: scalar scores (reward / value models) and
sequence classifiers (classification over `num_labels` labels, or regression).

    tokens -> Decoder.hidden_states -> [batch, length, d_model] -> ScalarHead -> [batch, length]
    tokens -> Decoder.hidden_states -> ClassHead `score`            -> [batch, length, labels]
    tokens -> Encoder.hidden_states -> (Pooler: tanh dense) -> ClassHead `classifier`
                                                                   -> [batch, length, labels]

`RewardModel` *is* a decoder (a subclass) whose LM head is replaced by a scalar head `score`,
so its parameter tree is a decoder's (`embed`, `blocks`, `final_norm`, ...) plus `score`: a
reward model starts from an SFT or pretrained decoder checkpoint by `config.init_from` (the
shared parameters are restored, `score` keeps its fresh init; training/checkpoint.py
`restore_params`), and a value model for PPO can start from a reward model the same way. The
untied `lm_head` is dropped, as a sequence-classification model drops it: it would cost
vocab x d_model parameters and optimizer state without ever getting a gradient. It returns a
score at every token; a stage reads each sequence's reward at its last real token
(objectives/pairs.py `segment_last`), a value model uses every token.

The sequence classifiers follow Hugging Face's `*ForSequenceClassification` parameter for
parameter, so checkpoints convert both ways (models/convert/heads.py):
- `SequenceClassifier` (model kind "classifier"): a decoder with `score` `[d_model,
  num_labels]`, no bias (GPT-2, Llama, Qwen2, Mistral); a sequence is read at its last real
  token, the only one that has seen all of it.
- `EncoderClassifier` (kind "encoder_classifier"): the encoder without its MLM head, with
  BERT's pooler (dense + tanh, `config.model.classifier_pooler`) and `classifier`
  `[d_model, num_labels]` + bias; a sequence is read at its first token ([CLS]).
`config.model.num_labels` is the number of outputs (1 for regression). Every model returns
its outputs at every token and the stage reads them where the data marks each sequence's
pooled token (data/classify.py): packed rows need no per-row bound on sequences, and the head
is a small share of the forward pass (BERT-base's pooler: <1%).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.decoder import Decoder
from models.encoder import Encoder
from models.layers import dense, dtype_of, param

# The encoder's masked-LM head (models/encoder.py), which a classifier drops.
MLM_HEAD_PARAMS = ("head_dense", "head_bias", "head_norm", "output_bias")


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


def num_labels_of(cfg: ml_collections.ConfigDict) -> int:
  """`config.model.num_labels` of a classifier (configs/classify.py adds the field)."""
  num = int(cfg.get("num_labels", 0))
  if num < 1:
    raise ValueError(f"config.model.num_labels must be >= 1 for a sequence classifier, got "
                     f"{num}")
  return num


class ClassHead(nnx.Module):
  """hidden `[batch, length, d_model]` -> float32 `[batch, length, num_labels]`: h W (+ b).

  Params: `kernel` `[d_model, num_labels]` ("embed", "score": the label dim is replicated, as
  a reward head's) and, with `bias`, `bias` `[num_labels]` ("score",).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, num_labels: int, *, rngs: nnx.Rngs,
               bias: bool):
    pdt = dtype_of(cfg.param_dtype)
    self.kernel = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model, num_labels),
                        ("embed", "score"), pdt)
    self.use_bias = bias
    if bias:
      self.bias = param(rngs, nnx.initializers.zeros, (num_labels,), ("score",), pdt)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    # float32 accumulation, as ScalarHead: logits are compared across labels and sequences.
    out = dense(hidden, self.kernel[...].astype(hidden.dtype),
                preferred_element_type=jnp.float32)
    if self.use_bias:
      out = out + self.bias[...].astype(jnp.float32)
    return out


class Pooler(nnx.Module):
  """BERT's pooler: tanh(h W + b), `[d_model, d_model]` (named like the MLM head's dense)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    pdt = dtype_of(cfg.param_dtype)
    self.kernel = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model, cfg.d_model),
                        ("embed", "mlp"), pdt)
    self.bias = param(rngs, nnx.initializers.zeros, (cfg.d_model,), ("norm",), pdt)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    h = dense(hidden, self.kernel[...].astype(hidden.dtype))
    return jnp.tanh(h + self.bias[...].astype(hidden.dtype))


class SequenceClassifier(Decoder):
  """A decoder with a `score` head over `num_labels` outputs instead of its LM head."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    if hasattr(self, "lm_head"):
      del self.lm_head
    self.score = ClassHead(cfg, num_labels_of(cfg), rngs=rngs, bias=False)

  def logits(self, hidden: jax.Array) -> jax.Array:
    raise TypeError("a SequenceClassifier has no LM head; call it for per-token label logits")

  def __call__(self, tokens: jax.Array, *, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    """Label logits (regression: predictions) at every token, `[batch, length, num_labels]`
    float32; a sequence's are those at its last token."""
    return self.score(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))


class EncoderClassifier(Encoder):
  """The encoder with BERT's sequence-classification head instead of its MLM head."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    for name in MLM_HEAD_PARAMS:
      delattr(self, name)
    self.use_pooler = bool(cfg.get("classifier_pooler", False))
    if self.use_pooler:
      self.pooler = Pooler(cfg, rngs=rngs)
    self.classifier = ClassHead(cfg, num_labels_of(cfg), rngs=rngs, bias=True)

  def logits(self, hidden: jax.Array) -> jax.Array:
    raise TypeError("an EncoderClassifier has no MLM head; call it for per-token label logits")

  def __call__(self, tokens: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Label logits at every token, `[batch, length, num_labels]` float32; a sequence's are
    those at its first token ([CLS]). Arguments as `Encoder.hidden_states`."""
    hidden = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids,
                                token_type_ids=token_type_ids)
    if self.use_pooler:
      hidden = self.pooler(hidden)
    return self.classifier(hidden)

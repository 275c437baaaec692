"""Per-family tables: Hugging Face config <-> `config.model`, HF tensor names <-> our params
(Llama, Qwen2, Mistral, GPT-2 for the decoder; BERT for the MLM encoder).

A family is data, not code: how to read a config, how to write one, and a list of
`TensorMap`s. Each map names HF tensors (with `{i}` for the layer index), our param paths
(inside a block for per-layer maps) and a layout `kind`:

  linear  torch `nn.Linear` weight `[out, in]` <-> ours `[*in_dims, *out_dims]` (transposed);
  conv1d  GPT-2 `Conv1D` weight `[in, out]` <-> ours `[*in_dims, *out_dims]` (reshaped only);
  copy    same values, ours reshaped (`n_in` 1: a 2-D table, 0: a flat vector);
  split   one HF tensor <-> several of ours, concatenated along HF's last axis (GPT-2 c_attn).

`n_in` is how many leading dims of our param form HF's input dim (2 for `o [heads, head_dim,
d]`). RoPE needs no permutation: our `apply_rope` is the half-split (`rotate_half`) layout that
HF's Llama code uses, so q / k weights map as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

Path = tuple[str, ...]
# Our model kinds with the encoder's body (models/build.py): the MLM encoder and its classifier.
ENCODER_KINDS = ("encoder", "encoder_classifier")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  hf: tuple[str, ...]        # HF tensor names; "{i}" is the layer index
  ours: tuple[Path, ...]     # our param paths (relative to a block when per_layer)
  kind: str                  # linear | conv1d | copy | split
  n_in: int = 1
  per_layer: bool = True


@dataclasses.dataclass(frozen=True)
class Family:
  name: str                                   # HF model_type written on export
  architecture: str                           # HF class written as `architectures`
  read_config: Callable[[dict], dict]         # HF config.json -> config.model fields
  write_config: Callable[[ml_collections.ConfigDict], dict]
  tensor_maps: Callable[[ml_collections.ConfigDict], list[TensorMap]]
  # HF tensors that carry no weights (causal-mask buffers, RoPE caches): skipped on import.
  ignored: Callable[[str], bool] = lambda name: name.endswith("rotary_emb.inv_freq")
  prefix: str = ""                            # optional leading scope stripped on import
  kind: str = "decoder"                       # our model kind of the family's LM class
  # Older spellings of a tensor name in the files -> the table's name (applied on import).
  canonical: Callable[[str], str] = lambda name: name
  # Leading scopes of the task heads, which sit outside `prefix` (BertForMaskedLM's `cls.`):
  # a checkpoint without any tensor of a head (a base model) gets that head fresh or tied.
  heads: tuple[str, ...] = ("lm_head.", "score.")


def _lin(hf, ours, n_in=1):
  return TensorMap((hf,), (ours,), "linear", n_in)


def _copy(hf, ours, n_in=0, per_layer=True):
  return TensorMap((hf,), (ours,), "copy", n_in, per_layer)


# --- Llama / Qwen2 / Mistral -----------------------------------------------------------------


def _rope_from_hf(hf: dict) -> tuple[float, dict]:
  """(theta, rope_scaling fields) from either transformers-5 `rope_parameters` or the older
  top-level `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  merged = {**legacy, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind == "default":
    return theta, dict(type="none")
  if kind == "linear":
    return theta, dict(type="linear", factor=float(merged["factor"]))
  if kind == "llama3":
    return theta, dict(type="llama3", factor=float(merged["factor"]),
                       low_freq_factor=float(merged["low_freq_factor"]),
                       high_freq_factor=float(merged["high_freq_factor"]),
                       original_max_length=int(merged["original_max_position_embeddings"]))
  raise ValueError(f"RoPE scaling {kind!r} is not supported (default | linear | llama3)")


def _rope_to_hf(cfg: ml_collections.ConfigDict) -> dict:
  """Both spellings, so transformers 4.x (`rope_theta`/`rope_scaling`) and 5.x
  (`rope_parameters`) read the same RoPE."""
  scaling = cfg.get("rope_scaling")
  kind = "none" if scaling is None else scaling.type
  if kind == "none":
    legacy, params = None, dict(rope_type="default", rope_theta=cfg.rope_theta)
  elif kind == "linear":
    legacy = dict(rope_type="linear", factor=scaling.factor)
    params = dict(legacy, rope_theta=cfg.rope_theta)
  else:
    legacy = dict(rope_type="llama3", factor=scaling.factor,
                  low_freq_factor=scaling.low_freq_factor,
                  high_freq_factor=scaling.high_freq_factor,
                  original_max_position_embeddings=int(scaling.original_max_length))
    params = dict(legacy, rope_theta=cfg.rope_theta)
  return dict(rope_theta=cfg.rope_theta, rope_scaling=legacy, rope_parameters=params)


def _llama_read(hf: dict) -> dict:
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) is supported")
  heads = hf["num_attention_heads"]
  theta, scaling = _rope_from_hf(hf)
  model_type = hf["model_type"]
  bias = bool(hf.get("attention_bias", False))
  qkv_bias, out_bias = (True, False) if model_type == "qwen2" else (bias, bias)
  return dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
      position="rope", rope_theta=theta, rope_scaling=scaling,
      max_length=hf.get("max_position_embeddings", 2048), activation="swiglu",
      qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _llama_write(model_type: str):
  def write(cfg: ml_collections.ConfigDict) -> dict:
    if cfg.activation != "swiglu" or cfg.norm != "rmsnorm" or cfg.position != "rope":
      raise ValueError(f"{model_type} needs swiglu / rmsnorm / rope")
    if model_type == "qwen2" and not (cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias):
      raise ValueError("qwen2 has q/k/v biases only")
    if model_type != "qwen2" and cfg.qkv_bias != cfg.out_bias:
      raise ValueError(f"{model_type}: attention_bias covers q/k/v and o together")
    out = dict(
        model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim or cfg.d_model // cfg.num_heads,
        intermediate_size=cfg.mlp_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_length, tie_word_embeddings=cfg.tie_embeddings,
        **_rope_to_hf(cfg))
    if model_type == "qwen2":
      out.update(use_sliding_window=False, sliding_window=None)
    else:
      out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if model_type == "mistral":
      out.update(sliding_window=cfg.get("sliding_window", 0) or None)
    return out
  return write


def _llama_maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  at, mp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  maps = [
      _copy("model.embed_tokens.weight", ("embed",), n_in=1, per_layer=False),
      _copy("model.norm.weight", ("final_norm", "scale"), per_layer=False),
      _copy("model.layers.{i}.input_layernorm.weight", ("attn_norm", "scale")),
      _copy("model.layers.{i}.post_attention_layernorm.weight", ("mlp_norm", "scale")),
      _lin(at + "q_proj.weight", ("attn", "q")),
      _lin(at + "k_proj.weight", ("attn", "k")),
      _lin(at + "v_proj.weight", ("attn", "v")),
      _lin(at + "o_proj.weight", ("attn", "o"), n_in=2),
      _lin(mp + "gate_proj.weight", ("mlp", "gate")),
      _lin(mp + "up_proj.weight", ("mlp", "up")),
      _lin(mp + "down_proj.weight", ("mlp", "down")),
  ]
  if not cfg.tie_embeddings:
    maps.append(TensorMap(("lm_head.weight",), (("lm_head",),), "linear", 1, per_layer=False))
  if cfg.qkv_bias:
    maps += [_copy(at + f"{n}_proj.bias", ("attn", f"{n}_bias")) for n in "qkv"]
  if cfg.out_bias:
    maps.append(_copy(at + "o_proj.bias", ("attn", "o_bias")))
  if cfg.mlp_bias:
    maps += [_copy(mp + f"{n}_proj.bias", ("mlp", f"{n}_bias")) for n in ("gate", "up", "down")]
  return maps


def _llama_ignored(name: str) -> bool:
  return name.endswith("rotary_emb.inv_freq")


# --- GPT-2 ------------------------------------------------------------------------------------

_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_read(hf: dict) -> dict:
  if hf.get("activation_function", "gelu_new") not in _GPT2_GELUS:
    raise ValueError(f"activation_function {hf['activation_function']!r}: only the tanh GELU "
                     f"approximation ({', '.join(_GPT2_GELUS)}) is supported")
  if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
    raise ValueError("GPT-2 attention scaling variants are not supported")
  d = hf["n_embd"]
  return dict(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
      num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d,
      norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
      max_length=hf["n_positions"], activation="gelu", qkv_bias=True, out_bias=True,
      mlp_bias=True, tie_embeddings=True)


def _gpt2_write(cfg: ml_collections.ConfigDict) -> dict:
  need = dict(norm="layernorm", position="learned", activation="gelu", qkv_bias=True,
              out_bias=True, mlp_bias=True, tie_embeddings=True)
  wrong = {k: cfg[k] for k, v in need.items() if cfg[k] != v}
  if wrong or cfg.num_kv_heads != cfg.num_heads or (cfg.head_dim or cfg.d_model // cfg.num_heads
                                                    ) * cfg.num_heads != cfg.d_model:
    raise ValueError(f"gpt2 export needs {need}, num_kv_heads == num_heads and head_dim * "
                     f"num_heads == d_model; got {wrong}")
  return dict(model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.d_model,
              n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
              n_positions=cfg.max_length, layer_norm_epsilon=cfg.norm_eps,
              activation_function="gelu_new", tie_word_embeddings=True)


def _gpt2_maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  del cfg
  h = "transformer.h.{i}."
  return [
      _copy("transformer.wte.weight", ("embed",), n_in=1, per_layer=False),
      _copy("transformer.wpe.weight", ("pos_embed",), n_in=1, per_layer=False),
      _copy("transformer.ln_f.weight", ("final_norm", "scale"), per_layer=False),
      _copy("transformer.ln_f.bias", ("final_norm", "bias"), per_layer=False),
      _copy(h + "ln_1.weight", ("attn_norm", "scale")),
      _copy(h + "ln_1.bias", ("attn_norm", "bias")),
      _copy(h + "ln_2.weight", ("mlp_norm", "scale")),
      _copy(h + "ln_2.bias", ("mlp_norm", "bias")),
      TensorMap((h + "attn.c_attn.weight",), (("attn", "q"), ("attn", "k"), ("attn", "v")),
                "split", 1),
      TensorMap((h + "attn.c_attn.bias",),
                (("attn", "q_bias"), ("attn", "k_bias"), ("attn", "v_bias")), "split", 0),
      TensorMap((h + "attn.c_proj.weight",), (("attn", "o"),), "conv1d", 2),
      _copy(h + "attn.c_proj.bias", ("attn", "o_bias")),
      TensorMap((h + "mlp.c_fc.weight",), (("mlp", "up"),), "conv1d", 1),
      _copy(h + "mlp.c_fc.bias", ("mlp", "up_bias")),
      TensorMap((h + "mlp.c_proj.weight",), (("mlp", "down"),), "conv1d", 1),
      _copy(h + "mlp.c_proj.bias", ("mlp", "down_bias")),
  ]


def _gpt2_ignored(name: str) -> bool:
  # Causal-mask buffers of old checkpoints, and the LM head tied to wte.
  return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"


# --- BERT (masked LM) -------------------------------------------------------------------------

# HF `hidden_act` -> our gelu_approximate: "gelu" is the exact erf form BERT was trained with.
_BERT_GELUS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


def _bert_read(hf: dict) -> dict:
  act = hf.get("hidden_act", "gelu")
  if act not in _BERT_GELUS:
    raise ValueError(f"hidden_act {act!r}: only GELU ({', '.join(_BERT_GELUS)}) is supported")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r}: only "
                     "'absolute' (learned positions) is supported")
  if hf.get("is_decoder") or not hf.get("tie_word_embeddings", True):
    raise ValueError("only the bidirectional BERT with its MLM decoder tied to the word "
                     "embeddings converts (is_decoder=False, tie_word_embeddings=True)")
  if hf.get("type_vocab_size", 2) < 1:
    raise ValueError("type_vocab_size must be at least 1")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  return dict(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
      mlp_dim=hf["intermediate_size"], norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
      position="learned", max_length=hf["max_position_embeddings"], activation="gelu",
      gelu_approximate=_BERT_GELUS[act], qkv_bias=True, out_bias=True, mlp_bias=True,
      tie_embeddings=True, norm_position="post", embed_norm=True,
      type_vocab_size=hf.get("type_vocab_size", 2))


def _bert_write(cfg: ml_collections.ConfigDict) -> dict:
  need = dict(norm="layernorm", position="learned", activation="gelu", qkv_bias=True,
              out_bias=True, mlp_bias=True, norm_position="post", embed_norm=True)
  wrong = {k: cfg[k] for k, v in need.items() if cfg[k] != v}
  if (wrong or cfg.type_vocab_size < 1 or cfg.num_kv_heads != cfg.num_heads
      or (cfg.head_dim or cfg.d_model // cfg.num_heads) * cfg.num_heads != cfg.d_model):
    raise ValueError(f"bert export needs {need}, type_vocab_size >= 1, num_kv_heads == "
                     f"num_heads and head_dim * num_heads == d_model; got {wrong}")
  return dict(model_type="bert", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              intermediate_size=cfg.mlp_dim,
              hidden_act="gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu",
              max_position_embeddings=cfg.max_length, type_vocab_size=cfg.type_vocab_size,
              layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute", is_decoder=False,
              tie_word_embeddings=True, hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1)


def _bert_maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  del cfg
  e, h, c = "bert.embeddings.", "bert.encoder.layer.{i}.", "cls.predictions."
  at = h + "attention."
  return [
      _copy(e + "word_embeddings.weight", ("embed",), n_in=1, per_layer=False),
      _copy(e + "position_embeddings.weight", ("pos_embed",), n_in=1, per_layer=False),
      _copy(e + "token_type_embeddings.weight", ("type_embed",), n_in=1, per_layer=False),
      _copy(e + "LayerNorm.weight", ("embed_norm", "scale"), per_layer=False),
      _copy(e + "LayerNorm.bias", ("embed_norm", "bias"), per_layer=False),
      *[_lin(at + f"self.{n}.weight", ("attn", n[0])) for n in ("query", "key", "value")],
      *[_copy(at + f"self.{n}.bias", ("attn", f"{n[0]}_bias")) for n in ("query", "key", "value")],
      _lin(at + "output.dense.weight", ("attn", "o"), n_in=2),
      _copy(at + "output.dense.bias", ("attn", "o_bias")),
      # Post-norm: the LayerNorm after the attention residual is our `attn_norm`.
      _copy(at + "output.LayerNorm.weight", ("attn_norm", "scale")),
      _copy(at + "output.LayerNorm.bias", ("attn_norm", "bias")),
      _lin(h + "intermediate.dense.weight", ("mlp", "up")),
      _copy(h + "intermediate.dense.bias", ("mlp", "up_bias")),
      _lin(h + "output.dense.weight", ("mlp", "down")),
      _copy(h + "output.dense.bias", ("mlp", "down_bias")),
      _copy(h + "output.LayerNorm.weight", ("mlp_norm", "scale")),
      _copy(h + "output.LayerNorm.bias", ("mlp_norm", "bias")),
      TensorMap((c + "transform.dense.weight",), (("head_dense",),), "linear", 1, per_layer=False),
      _copy(c + "transform.dense.bias", ("head_bias",), per_layer=False),
      _copy(c + "transform.LayerNorm.weight", ("head_norm", "scale"), per_layer=False),
      _copy(c + "transform.LayerNorm.bias", ("head_norm", "bias"), per_layer=False),
      _copy(c + "bias", ("output_bias",), per_layer=False),
  ]


def _bert_ignored(name: str) -> bool:
  # The decoder tied to the word embeddings (weight) and to `cls.predictions.bias`; the
  # position-id buffer of old checkpoints; the pooler and next-sentence head of
  # BertForPreTraining / BertModel, which MLM does not use.
  return (name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                   "bert.embeddings.position_ids")
          or name.startswith(("bert.pooler.", "cls.seq_relationship.")))


def _bert_canonical(name: str) -> str:
  # Checkpoints converted from the original TensorFlow release (bert-base-uncased on the Hub)
  # name LayerNorm params gamma / beta; transformers renames them on load, and so do we.
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                     "LayerNorm.bias")


FAMILIES: dict[str, Family] = {
    # prefix: base-model checkpoints (LlamaModel, Qwen2Model, ...) name tensors without it.
    "llama": Family("llama", "LlamaForCausalLM", _llama_read, _llama_write("llama"),
                    _llama_maps, _llama_ignored, prefix="model."),
    "mistral": Family("mistral", "MistralForCausalLM", _llama_read, _llama_write("mistral"),
                      _llama_maps, _llama_ignored, prefix="model."),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _llama_read, _llama_write("qwen2"),
                    _llama_maps, _llama_ignored, prefix="model."),
    "gpt2": Family("gpt2", "GPT2LMHeadModel", _gpt2_read, _gpt2_write, _gpt2_maps,
                   _gpt2_ignored, prefix="transformer."),
    "bert": Family("bert", "BertForMaskedLM", _bert_read, _bert_write, _bert_maps,
                   _bert_ignored, prefix="bert.", kind="encoder", canonical=_bert_canonical,
                   heads=("cls.", "classifier.")),
}

def infer_family(cfg: ml_collections.ConfigDict, kind: str = "decoder") -> Family:
  """The HF family that represents `config.model` of our model `kind` (Mistral only when asked
  for by name; every encoder is a BERT)."""
  if kind in ENCODER_KINDS:
    return FAMILIES["bert"]
  if cfg.position == "learned":
    return FAMILIES["gpt2"]
  if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
    return FAMILIES["qwen2"]
  return FAMILIES["llama"]

"""Gemma 2 and Gemma 3 (text): the Llama tensor table plus sandwich norms, read and written.

  gemma2        GeGLU MLP (tanh GELU gate), embeddings * sqrt(d_model), (1 + w) RMSNorm, a norm
                before and after both attention and MLP (`input_layernorm` /
                `post_attention_layernorm`, `pre_feedforward_layernorm` /
                `post_feedforward_layernorm`), logits scaled by query_pre_attn_scalar**-0.5,
                attention logits soft-capped (`attn_logit_softcapping`, 50 in every release) and
                output logits (`final_logit_softcapping`, 30); `layer_types` alternate local
                (sliding window) and global layers, local first; one RoPE for all layers.
  gemma3_text   Gemma 2's body with per-head q/k RMSNorm (also 1 + w) and no soft-capping
                (HF's Gemma 3 attention ignores `attn_logit_softcapping`, and so does this
                table); five local layers then one global; local layers rotate by
                `rope_local_base_freq` (transformers 5: `rope_parameters.sliding_attention`),
                global ones by `rope_theta` with `rope_scaling` (`rope_parameters.full_attention`).
  gemma3        the multimodal checkpoints (`Gemma3ForConditionalGeneration`: Gemma 3 4B, 12B,
                27B as published) read as their text decoder: the `text_config` (which lists
                only the fields that differ from transformers' Gemma3TextConfig defaults, so
                those defaults fill the rest), the `language_model.` tensors (the hub's
                `language_model.model.*`, or transformers 4.5x's `model.language_model.*`)
                under gemma3_text's table, the vision tower and projector skipped. Import
                only: such a model exports as gemma3_text (`Gemma3ForCausalLM`), which
                transformers and the multimodal model's text path load alike.

Norm weights are stored as Gemma stores them (the w of 1 + w, config.model.norm_plus_one), so
they copy exactly both ways. `layer_types` converts to `sliding_window_pattern` N (layer i
global when (i + 1) % N == 0); a list that is no such pattern is refused.
"""

from __future__ import annotations

import ml_collections

from models.convert.families import (Family, TensorMap, _copy, _lin, _llama_ignored,
                                     _rope_from_hf, _rope_to_hf)
from models.layer_pattern import layer_kinds

# HF hidden_activation -> our gelu_approximate (Gemma 2 / 3 ship gelu_pytorch_tanh).
_GELUS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}
# The pattern period each family writes by default (HF's own default layer_types).
_DEFAULT_PERIOD = {"gemma2": 2, "gemma3_text": 6}


def _period(hf: dict) -> int:
  """`sliding_window_pattern` N of an HF config's `layer_types` (module docstring)."""
  n = hf["num_hidden_layers"]
  default = int(hf.get("sliding_window_pattern") or _DEFAULT_PERIOD[hf["model_type"]])
  types = hf.get("layer_types")
  if types is None:
    return default
  types = list(types)
  for period in [default] + list(range(1, n + 2)):
    if types == ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                 for i in range(n)]:
      return period
  raise ValueError(f"layer_types {types} is not one local / global pattern (every N-th layer "
                   "full_attention, the others sliding_attention)")


def _gemma3_rope(hf: dict) -> tuple[float, dict, float]:
  """(global theta, global rope_scaling fields, local theta) from transformers-5
  `rope_parameters` keyed by layer type, or the older rope_theta / rope_scaling /
  rope_local_base_freq."""
  params = dict(hf.get("rope_parameters") or {})
  if "full_attention" in params or "sliding_attention" in params:
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
  else:
    full = dict(hf.get("rope_scaling") or {})
    local = dict(rope_theta=hf.get("rope_local_base_freq", 10000.0))
  full.setdefault("rope_theta", hf.get("rope_theta", 1000000.0))
  if local.get("rope_type", local.get("type", "default")) != "default":
    raise ValueError(f"local-layer RoPE scaling {local} is not supported (default only)")
  theta, scaling = _rope_from_hf(dict(rope_parameters=full))
  return theta, scaling, float(local.get("rope_theta", 10000.0))


def _gemma_read(hf: dict) -> dict:
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in _GELUS:
    raise ValueError(f"hidden_activation {act!r}: only GELU ({', '.join(_GELUS)}) is supported")
  if hf.get("use_bidirectional_attention"):
    raise ValueError("use_bidirectional_attention: only causal Gemma decoders are supported")
  gemma3 = hf["model_type"] == "gemma3_text"
  heads, d = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim") or d // heads
  if gemma3:
    theta, scaling, local_theta = _gemma3_rope(hf)
  else:
    (theta, scaling), local_theta = _rope_from_hf(hf), 0.0
  bias = bool(hf.get("attention_bias", False))
  final_cap = hf.get("final_logit_softcapping") or 0.0
  attn_cap = 0.0 if gemma3 else hf.get("attn_logit_softcapping") or 0.0
  return dict(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      mlp_dim=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
      position="rope", rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
      max_length=hf.get("max_position_embeddings", 8192), activation="geglu",
      gelu_approximate=_GELUS[act], qkv_bias=bias, out_bias=bias, mlp_bias=False,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), qk_norm=gemma3,
      scale_embeddings=True, norm_plus_one=True, sandwich_norms=True,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
      attn_softcap=float(attn_cap), final_softcap=float(final_cap),
      sliding_window=int(hf.get("sliding_window") or 0), sliding_window_pattern=_period(hf))


def _layer_types(cfg: ml_collections.ConfigDict) -> list[str]:
  kinds = layer_kinds(cfg)
  if kinds is None:
    if cfg.get("sliding_window", 0):
      raise ValueError("a Gemma export with sliding_window needs sliding_window_pattern > 0 "
                       "(which layers are local)")
    kinds = (False,) * cfg.num_layers
  return ["sliding_attention" if local else "full_attention" for local in kinds]


def _gemma_write(model_type: str):
  gemma3 = model_type == "gemma3_text"

  def write(cfg: ml_collections.ConfigDict) -> dict:
    need = dict(activation="geglu", norm="rmsnorm", position="rope", scale_embeddings=True,
                norm_plus_one=True, sandwich_norms=True, qk_norm=gemma3, mlp_bias=False,
                num_experts=0)
    wrong = {k: cfg.get(k) for k, v in need.items() if cfg.get(k) != v}
    if wrong or cfg.qkv_bias != cfg.out_bias:
      raise ValueError(f"{model_type} export needs {need} and qkv_bias == out_bias; got {wrong}")
    if gemma3 and cfg.get("attn_softcap", 0.0):
      raise ValueError("gemma3_text has no attention-logit soft-capping (attn_softcap 0)")
    if not gemma3 and cfg.get("rope_local_theta", 0.0):
      raise ValueError("gemma2 has one RoPE for every layer (rope_local_theta 0)")
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    scalar = float(cfg.query_pre_attn_scalar or head_dim)
    out = dict(
        model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu",
        max_position_embeddings=cfg.max_length, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=bool(cfg.qkv_bias),
        query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,  # HF: an int
        sliding_window=cfg.sliding_window or None, layer_types=_layer_types(cfg),
        final_logit_softcapping=cfg.final_softcap or None,
        attn_logit_softcapping=cfg.attn_softcap or None)
    rope = _rope_to_hf(cfg)
    if not gemma3:
      return dict(out, **rope)
    local = cfg.rope_local_theta or cfg.rope_theta
    # transformers 5 reads rope_parameters per layer type; 4.x the flat fields.
    return dict(out, rope_theta=cfg.rope_theta, rope_scaling=rope["rope_scaling"],
                rope_local_base_freq=local, sliding_window_pattern=cfg.sliding_window_pattern,
                rope_parameters=dict(full_attention=rope["rope_parameters"],
                                     sliding_attention=dict(rope_type="default",
                                                            rope_theta=local)))
  return write


def _gemma_maps(model_type: str):
  def maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
    ly, at, mp = "model.layers.{i}.", "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    out = [
        _copy("model.embed_tokens.weight", ("embed",), n_in=1, per_layer=False),
        _copy("model.norm.weight", ("final_norm", "scale"), per_layer=False),
        _copy(ly + "input_layernorm.weight", ("attn_norm", "scale")),
        _copy(ly + "post_attention_layernorm.weight", ("post_attn_norm", "scale")),
        _copy(ly + "pre_feedforward_layernorm.weight", ("mlp_norm", "scale")),
        _copy(ly + "post_feedforward_layernorm.weight", ("post_mlp_norm", "scale")),
        _lin(at + "q_proj.weight", ("attn", "q")),
        _lin(at + "k_proj.weight", ("attn", "k")),
        _lin(at + "v_proj.weight", ("attn", "v")),
        _lin(at + "o_proj.weight", ("attn", "o"), n_in=2),
        _lin(mp + "gate_proj.weight", ("mlp", "gate")),
        _lin(mp + "up_proj.weight", ("mlp", "up")),
        _lin(mp + "down_proj.weight", ("mlp", "down")),
    ]
    if model_type == "gemma3_text":
      out += [_copy(at + "q_norm.weight", ("attn", "q_norm", "scale")),
              _copy(at + "k_norm.weight", ("attn", "k_norm", "scale"))]
    if not cfg.tie_embeddings:
      out.append(TensorMap(("lm_head.weight",), (("lm_head",),), "linear", 1, per_layer=False))
    if cfg.qkv_bias:
      out += [_copy(at + f"{n}_proj.bias", ("attn", f"{n}_bias")) for n in "qkv"]
      out.append(_copy(at + "o_proj.bias", ("attn", "o_bias")))
    return out
  return maps


# transformers' Gemma3TextConfig defaults (the published multimodal configs omit these fields).
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True,
    attention_bias=False)
# Where the text decoder's tensors sit in a multimodal checkpoint -> gemma3_text's names.
_MULTIMODAL_SCOPES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                      ("language_model.lm_head.", "lm_head."))
_VISION_SCOPES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                  "model.multi_modal_projector.")


def _gemma3_multimodal_read(hf: dict) -> dict:
  text = {**_GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {}), "model_type": "gemma3_text"}
  if "tie_word_embeddings" in hf:
    text["tie_word_embeddings"] = hf["tie_word_embeddings"]
  return _gemma_read(text)


def _gemma3_multimodal_name(name: str) -> str:
  for scope, ours in _MULTIMODAL_SCOPES:
    if name.startswith(scope):
      return ours + name[len(scope):]
  return name


def _gemma3_multimodal_write(cfg: ml_collections.ConfigDict) -> dict:
  raise ValueError("gemma3 (Gemma3ForConditionalGeneration) is read only: export the text "
                   "decoder as gemma3_text")


GEMMA_FAMILIES: dict[str, Family] = {
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", _gemma_read, _gemma_write("gemma2"),
                     _gemma_maps("gemma2"), _llama_ignored, prefix="model."),
    "gemma3_text": Family("gemma3_text", "Gemma3ForCausalLM", _gemma_read,
                          _gemma_write("gemma3_text"), _gemma_maps("gemma3_text"),
                          _llama_ignored, prefix="model."),
    "gemma3": Family("gemma3", "Gemma3ForConditionalGeneration", _gemma3_multimodal_read,
                     _gemma3_multimodal_write, _gemma_maps("gemma3_text"),
                     lambda name: _llama_ignored(name) or name.startswith(_VISION_SCOPES),
                     prefix="model.", canonical=_gemma3_multimodal_name),
}


def infer_gemma_family(cfg: ml_collections.ConfigDict) -> Family | None:
  """The Gemma family that represents `config.model` (sandwich norms mark one), or None."""
  if not cfg.get("sandwich_norms", False):
    return None
  return GEMMA_FAMILIES["gemma3_text" if cfg.get("qk_norm", False) else "gemma2"]

"""Qwen3, Qwen3-MoE and Mixtral: the Llama table plus q/k norms and routed experts.

  qwen3       Llama body, per-head RMSNorm on q and k (`self_attn.q_norm` / `k_norm`, weight
              [head_dim]), `attention_bias` on q/k/v/o together (off in every release).
  mixtral     Llama body (no q/k norm), each MLP a router `block_sparse_moe.gate` [E, d] and E
              SwiGLU experts `experts.{e}.w1` (gate), `w3` (up), `w2` (down); top-k weights
              renormalised (softmax over the top-k logits).
  qwen3_moe   Qwen3 body, router `mlp.gate` and experts `mlp.experts.{e}.gate_proj / up_proj /
              down_proj` of width `moe_intermediate_size`; `norm_topk_prob` says whether the
              top-k weights are renormalised.

The expert tensors are the published (hub) layout, which transformers 5 also writes on save;
each maps to one stacked param `[experts, ...]` (layout kind `experts`, models/convert/
layout.py). Qwen3-MoE's dense layers (`mlp_only_layers`, `decoder_sparse_step` > 1) are
refused: every layer here has the same MLP kind. `registry.py` joins these to families.py.
"""

from __future__ import annotations

import ml_collections

from models.convert.families import (Family, TensorMap, _copy, _lin, _llama_ignored,
                                     _llama_maps, _llama_read, _llama_write)


def _qwen3_read(hf: dict) -> dict:
  return dict(_llama_read(hf), qk_norm=True)


def _moe_fields(hf: dict, *, experts: str, width: str, normalize: bool) -> dict:
  # transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`; read either.
  count = hf.get(experts) or hf.get("num_local_experts") or hf["num_experts"]
  return dict(num_experts=int(count), experts_per_token=int(hf["num_experts_per_tok"]),
              expert_mlp_dim=int(hf[width]), router_norm_topk=normalize,
              moe_aux_coef=float(hf.get("router_aux_loss_coef", 0.0)))


def _mixtral_read(hf: dict) -> dict:
  if hf.get("router_jitter_noise"):
    raise ValueError("router_jitter_noise > 0 is not supported (routing here is deterministic)")
  return dict(_llama_read(hf), **_moe_fields(hf, experts="num_local_experts",
                                            width="intermediate_size", normalize=True))


def _qwen3_moe_read(hf: dict) -> dict:
  if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
    raise ValueError("mlp_only_layers / decoder_sparse_step != 1: dense layers between MoE "
                     "layers are not supported (every layer is an MoE layer here)")
  return dict(_qwen3_read(hf), **_moe_fields(hf, experts="num_experts",
                                             width="moe_intermediate_size",
                                             normalize=bool(hf.get("norm_topk_prob", False))))


def _check(cfg: ml_collections.ConfigDict, model_type: str, *, qk_norm: bool, moe: bool,
           normalize: bool | None = None) -> None:
  wrong = []
  if bool(cfg.get("qk_norm", False)) != qk_norm:
    wrong.append(f"qk_norm={qk_norm}")
  if bool(cfg.get("num_experts", 0)) != moe:
    wrong.append("num_experts > 0" if moe else "num_experts = 0")
  if moe and normalize is not None and bool(cfg.router_norm_topk) != normalize:
    wrong.append(f"router_norm_topk={normalize}")
  if wrong:
    raise ValueError(f"{model_type} export needs {', '.join(wrong)}")


def _qwen3_write(cfg: ml_collections.ConfigDict) -> dict:
  _check(cfg, "qwen3", qk_norm=True, moe=False)
  return dict(_llama_write("qwen3")(cfg), use_sliding_window=False, sliding_window=None)


def _moe_config(cfg: ml_collections.ConfigDict) -> dict:
  return dict(num_experts_per_tok=cfg.experts_per_token,
              router_aux_loss_coef=cfg.get("moe_aux_coef", 0.0), output_router_logits=False)


def _mixtral_write(cfg: ml_collections.ConfigDict) -> dict:
  _check(cfg, "mixtral", qk_norm=False, moe=True, normalize=True)
  out = _llama_write("mixtral")(cfg)
  out.update(intermediate_size=cfg.expert_mlp_dim or cfg.mlp_dim,
             num_local_experts=cfg.num_experts, sliding_window=None, **_moe_config(cfg))
  return out


def _qwen3_moe_write(cfg: ml_collections.ConfigDict) -> dict:
  _check(cfg, "qwen3_moe", qk_norm=True, moe=True)
  out = _llama_write("qwen3_moe")(cfg)
  out.update(moe_intermediate_size=cfg.expert_mlp_dim or cfg.mlp_dim,
             num_experts=cfg.num_experts, num_local_experts=cfg.num_experts,
             norm_topk_prob=bool(cfg.router_norm_topk),
             decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
             sliding_window=None, **_moe_config(cfg))
  return out


def _qk_norm_maps() -> list[TensorMap]:
  at = "model.layers.{i}.self_attn."
  return [_copy(at + "q_norm.weight", ("attn", "q_norm", "scale")),
          _copy(at + "k_norm.weight", ("attn", "k_norm", "scale"))]


def _without_dense_mlp(maps: list[TensorMap]) -> list[TensorMap]:
  return [m for m in maps if not (m.ours[0][0] == "mlp" and m.per_layer)]


def _expert_maps(cfg: ml_collections.ConfigDict, scope: str, router: str,
                 names: dict[str, str]) -> list[TensorMap]:
  """Router and stacked experts; `names`: our gate / up / down -> HF per-expert name."""
  maps = [_lin(scope + router, ("mlp", "router"))]
  for ours, hf in names.items():
    per_expert = tuple(f"{scope}experts.{e}.{hf}.weight" for e in range(cfg.num_experts))
    maps.append(TensorMap(per_expert, (("mlp", ours),), "experts"))
  return maps


def _qwen3_maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  return _llama_maps(cfg) + _qk_norm_maps()


def _mixtral_maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  return _without_dense_mlp(_llama_maps(cfg)) + _expert_maps(
      cfg, "model.layers.{i}.block_sparse_moe.", "gate.weight",
      dict(gate="w1", up="w3", down="w2"))


def _qwen3_moe_maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  return _without_dense_mlp(_llama_maps(cfg)) + _qk_norm_maps() + _expert_maps(
      cfg, "model.layers.{i}.mlp.", "gate.weight",
      dict(gate="gate_proj", up="up_proj", down="down_proj"))


MOE_FAMILIES: dict[str, Family] = {
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", _qwen3_read, _qwen3_write, _qwen3_maps,
                    _llama_ignored, prefix="model."),
    "mixtral": Family("mixtral", "MixtralForCausalLM", _mixtral_read, _mixtral_write,
                      _mixtral_maps, _llama_ignored, prefix="model."),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_read, _qwen3_moe_write,
                        _qwen3_moe_maps, _llama_ignored, prefix="model."),
}


def infer_moe_family(cfg: ml_collections.ConfigDict) -> Family | None:
  """The family above that represents `config.model`, or None (a families.py model)."""
  if cfg.get("num_experts", 0):
    mixtral = cfg.router_norm_topk and not cfg.get("qk_norm", False)
    return MOE_FAMILIES["mixtral" if mixtral else "qwen3_moe"]
  if cfg.get("qk_norm", False):
    return MOE_FAMILIES["qwen3"]
  return None

"""Model FLOPs per trained token, for throughput and MFU.

    6 * N_matmul  +  6 * layers * heads * head_dim * seq_len

N_matmul counts every weight that takes part in a matmul (attention and MLP projections and the
LM head; not the embedding lookup, norms or biases); in a mixture-of-experts layer only the
router and the `experts_per_token` experts each token runs (active parameters). The second
term is causal self-attention: QK^T and PV cost 2 * 2 * seq * heads * head_dim FLOPs per token
forward over the full square; a causal mask needs half of it, and backward doubles forward, giving 3 * 2 = 6 (PaLM, Chowdhery
et al., 2022, appendix B counts the full square, 12 instead of 6; we count only the work a causal
model must do).
"""

from __future__ import annotations

import ml_collections


def matmul_params(cfg: ml_collections.ConfigDict) -> int:
  d, h, kh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim
  hd = cfg.head_dim or d // h
  attention = d * h * hd * 2 + d * kh * hd * 2          # q, o and k, v
  mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
  if cfg.get("num_experts", 0):
    # Active parameters only: the router, and the k SwiGLU experts a token goes through.
    mlp = cfg.experts_per_token * d * (cfg.expert_mlp_dim or f) * 3 + d * cfg.num_experts
  return cfg.num_layers * (attention + mlp) + d * cfg.vocab_size


def attention_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> int:
  hd = cfg.head_dim or cfg.d_model // cfg.num_heads
  return 6 * cfg.num_layers * cfg.num_heads * hd * seq_len


def train_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> int:
  """Forward + backward FLOPs per token of a causal LM train step."""
  return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> int:
  return train_flops_per_token(cfg, seq_len) // 3

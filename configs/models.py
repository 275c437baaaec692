"""Model presets: one function per architecture size, each returning a `model` ConfigDict.

Every stage config picks one with `model_config(name)`. Fields:
  vocab_size, d_model, num_layers, num_heads, num_kv_heads (< num_heads: grouped-query attention),
  head_dim (0: d_model // num_heads), mlp_dim, norm ('rmsnorm' | 'layernorm'), norm_eps,
  position ('rope' | 'learned'), rope_theta, rope_scaling (see `base_model_config`), max_length
  (learned positions / RoPE tables),
  activation ('swiglu' | 'geglu' | 'gelu'; geglu: a GELU-gated unit, Gemma), gelu_approximate
  (tanh GELU, else exact erf), qkv_bias,
  out_bias, mlp_bias, tie_embeddings,
  dtype (compute), param_dtype, remat ('none' | 'full' | 'save_dots'), scan_layers,
  attention (the kernel, models/attention_kernels.py: 'auto' picks by the platform the step
  runs on, TPU 'splash', GPU 'pallas_gpu', CPU 'blockwise'; 'dense': the plain [q, k]
  softmax, the reference; 'blockwise': models/flash_attention.py, query blocks skipping the key
  blocks that the causal mask, window or segment ids exclude, with a recomputing backward;
  'splash': the Pallas TPU kernel; 'cudnn': cuDNN fused attention, rows of one document;
  'pallas_gpu': the Pallas Triton kernel with segment ids. A forced kernel that cannot serve
  the run fails config validation), attention_block (blockwise: query and key rows per block,
  grown to length / 16 on long rows), attention_kernel_block (splash / pallas_gpu tile rows, 0
  or a power of two >= 128; 0: the kernel's default, splash the largest of 512 / 256 / 128
  that pads rows least, pallas_gpu 128), sliding_window (0: none; else a query attends to its
  last sliding_window tokens, itself included: Mistral),
  init_std.
Encoder only (models/encoder.py; BERT sets all three): norm_position ('pre' | 'post'),
  embed_norm (a norm on the summed embeddings), type_vocab_size (token-type embeddings; 0: none).
"""

import ml_collections


def base_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=32000,
      d_model=512,
      num_layers=8,
      num_heads=8,
      num_kv_heads=8,
      head_dim=0,
      mlp_dim=1536,
      norm="rmsnorm",
      norm_eps=1e-5,
      position="rope",
      rope_theta=10000.0,
      # RoPE frequency scaling for long context: type 'none' | 'linear' (positions / factor)
      # | 'llama3' (Llama-3.1: low frequencies / factor, high kept, smooth in between).
      rope_scaling=ml_collections.ConfigDict(dict(
          type="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_length=8192)),
      max_length=2048,
      activation="swiglu",
      # GELU form: tanh approximation (GPT-2) or exact erf (BERT, `hidden_act="gelu"` in HF).
      gelu_approximate=True,
      qkv_bias=False,
      out_bias=False,
      mlp_bias=False,
      tie_embeddings=False,
      dtype="float32",
      param_dtype="float32",
      remat="none",
      scan_layers=True,
      attention="auto",
      attention_block=128,
      attention_kernel_block=0,
      # Sliding-window attention (Mistral): a query sees its last `sliding_window` tokens (itself
      # included); 0: the whole segment.
      sliding_window=0,
      init_std=0.02,
      # Qwen3 / Gemma 3: RMSNorm (weight [head_dim]) over each head's queries and keys, before
      # RoPE (models/attention.py).
      qk_norm=False,
      # Gemma 2 / 3 (False / 0: off). scale_embeddings: embeddings times sqrt(d_model), in the
      # compute dtype. norm_plus_one: RMSNorm multiplies by (1 + scale), scale stored as Gemma
      # stores it (initialised at 0); q/k norms too. sandwich_norms: a norm on the attention
      # and MLP outputs too, before each residual add. query_pre_attn_scalar: attention logits
      # scaled by its -1/2 power (0: head_dim's). attn_softcap / final_softcap: c * tanh(x / c)
      # on the attention logits / output logits (Gemma 2: 50 / 30).
      scale_embeddings=False,
      norm_plus_one=False,
      sandwich_norms=False,
      query_pre_attn_scalar=0.0,
      attn_softcap=0.0,
      final_softcap=0.0,
      # Local / global layers (models/layer_pattern.py): with sliding_window_pattern N > 0,
      # every N-th layer (i + 1 divisible by N) is global (whole segment, rope_theta with
      # rope_scaling), the others local (sliding_window; RoPE base rope_local_theta, unscaled,
      # or 0: the global layers' RoPE). Gemma 2: N 2; Gemma 3: N 6, local base 10000.
      sliding_window_pattern=0,
      rope_local_theta=0.0,
      # Mixture of experts (models/moe.py; 0: a dense MLP). Each token goes to
      # `experts_per_token` of `num_experts` SwiGLU experts of width `expert_mlp_dim` (0:
      # mlp_dim), weighted by the router's softmax over all experts taken at the top k and,
      # with `router_norm_topk`, renormalised over them (Mixtral: True; Qwen3-MoE:
      # norm_topk_prob). `moe_aux_coef` scales the load-balancing loss (Switch / Mixtral:
      # num_experts * sum_e f_e P_e, k when balanced), `moe_z_coef` the router z-loss
      # (ST-MoE); both are added to the CLM objective (training/stages/clm.py).
      num_experts=0,
      experts_per_token=2,
      expert_mlp_dim=0,
      router_norm_topk=True,
      moe_aux_coef=0.0,
      moe_z_coef=0.0,
      # Encoder (BERT) switches, see the module docstring; the defaults are the pre-norm body.
      norm_position="pre",
      embed_norm=False,
      type_vocab_size=0,
  ))


PRESETS = {
    # Trains on 2 CPU cores in minutes; the vocabulary is the tiny world's sentencepiece model.
    "tiny": dict(vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 mlp_dim=384, max_length=256, tie_embeddings=True),
    # `tiny` with 8 SwiGLU experts of width 128 per layer, 2 per token (active MLP width 256,
    # total 1024): trains on CPU like `tiny` (configs/pretrain.py:tiny_moe).
    "tiny_moe": dict(vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                     mlp_dim=384, max_length=256, tie_embeddings=True, num_experts=8,
                     experts_per_token=2, expert_mlp_dim=128, moe_aux_coef=0.01,
                     moe_z_coef=0.001),
    # The benchmark shape (scripts/benchmark.py): d 512, 8 layers, 8 heads, SwiGLU 1536, vocab 8192.
    "bench": dict(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8,
                  mlp_dim=1536, max_length=512),
    # GPT-2-small scale with a LLaMA body.
    "125m": dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                 mlp_dim=2048, max_length=2048, tie_embeddings=True),
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
               mlp_dim=5632, max_length=4096, rope_theta=500000.0),
    # Meta Llama-3-8B: 32 layers, d 4096, 32 heads, 8 KV heads, SwiGLU 14336, vocab 128256.
    "llama3_8b": dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, mlp_dim=14336, max_length=8192, rope_theta=500000.0,
                      dtype="bfloat16", remat="full"),
    # Published shapes (config.json of each release) for compile checks; bf16, remat, scanned.
    # Qwen3-8B: 36 layers, d 4096, 32 heads of 128 over 8 KV heads, q/k norm, SwiGLU 12288.
    "qwen3_8b": dict(vocab_size=151936, d_model=4096, num_layers=36, num_heads=32,
                     num_kv_heads=8, head_dim=128, mlp_dim=12288, norm_eps=1e-6,
                     max_length=40960, rope_theta=1000000.0, qk_norm=True, dtype="bfloat16",
                     remat="full"),
    # Mixtral-8x7B: 32 layers, d 4096, 32 heads over 8 KV heads, 8 experts of 14336, top 2.
    "mixtral_8x7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, mlp_dim=14336, norm_eps=1e-5, max_length=32768,
                         rope_theta=1000000.0, num_experts=8, experts_per_token=2,
                         expert_mlp_dim=14336, router_norm_topk=True, moe_aux_coef=0.02,
                         dtype="bfloat16", remat="full"),
    # Qwen3-30B-A3B: 48 layers, d 2048, 32 heads of 128 over 4 KV heads, q/k norm, 128
    # experts of 768, top 8 renormalised.
    "qwen3_30b_a3b": dict(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32,
                          num_kv_heads=4, head_dim=128, mlp_dim=6144, norm_eps=1e-6,
                          max_length=40960, rope_theta=1000000.0, qk_norm=True,
                          num_experts=128, experts_per_token=8, expert_mlp_dim=768,
                          router_norm_topk=True, moe_aux_coef=0.001, dtype="bfloat16",
                          remat="full"),
    # Gemma-2-9B: 42 layers, d 3584, 16 heads of 256 over 8 KV heads, GeGLU 14336, vocab
    # 256000; local (window 4096) and global layers alternate; logits soft-capped at 50
    # (attention) and 30 (output); sandwich norms, (1 + w) RMSNorm, embeddings * sqrt(d).
    "gemma2_9b": dict(vocab_size=256000, d_model=3584, num_layers=42, num_heads=16,
                      num_kv_heads=8, head_dim=256, mlp_dim=14336, norm_eps=1e-6,
                      max_length=8192, rope_theta=10000.0, activation="geglu",
                      tie_embeddings=True, scale_embeddings=True, norm_plus_one=True,
                      sandwich_norms=True, query_pre_attn_scalar=256.0, attn_softcap=50.0,
                      final_softcap=30.0, sliding_window=4096, sliding_window_pattern=2,
                      dtype="bfloat16", remat="full"),
    # Gemma-3-12B (text): 48 layers, d 3840, 16 heads of 256 over 8 KV heads, GeGLU 15360,
    # vocab 262208, q/k norm; five local layers (window 1024, RoPE base 10000) then one global
    # (RoPE base 1e6, linear scaling 8); no soft-capping.
    "gemma3_12b": dict(vocab_size=262208, d_model=3840, num_layers=48, num_heads=16,
                       num_kv_heads=8, head_dim=256, mlp_dim=15360, norm_eps=1e-6,
                       max_length=131072, rope_theta=1000000.0,
                       rope_scaling=dict(type="linear", factor=8.0), activation="geglu",
                       tie_embeddings=True, scale_embeddings=True, norm_plus_one=True,
                       sandwich_norms=True, qk_norm=True, query_pre_attn_scalar=256.0,
                       sliding_window=1024, sliding_window_pattern=6, rope_local_theta=10000.0,
                       dtype="bfloat16", remat="full"),
}


def model_config(name: str) -> ml_collections.ConfigDict:
  """Returns the model ConfigDict of preset `name` (see PRESETS)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  config = base_model_config()
  config.update(PRESETS[name])
  return config

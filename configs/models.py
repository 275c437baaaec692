"""Model presets: one function per architecture size, each returning a `model` ConfigDict.

Every stage config picks one with `model_config(name)`. Fields:
  vocab_size, d_model, num_layers, num_heads, num_kv_heads (< num_heads: grouped-query attention),
  head_dim (0: d_model // num_heads), mlp_dim, norm ('rmsnorm' | 'layernorm'), norm_eps,
  position ('rope' | 'learned'), rope_theta, rope_scaling (see `base_model_config`), max_length
  (learned positions / RoPE tables),
  activation ('swiglu' | 'gelu'), gelu_approximate (tanh GELU, else exact erf), qkv_bias,
  out_bias, mlp_bias, tie_embeddings,
  dtype (compute), param_dtype, remat ('none' | 'full' | 'save_dots'), scan_layers,
  attention ('auto' = 'blockwise': models/flash_attention.py, query blocks with a recomputing
  backward; 'dense': the plain [q, k] softmax, the reference), attention_block (query rows per
  block, grown to length / 16 on long rows), sliding_window (0: none; else a query attends to its
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
      # Sliding-window attention (Mistral): a query sees its last `sliding_window` tokens (itself
      # included); 0: the whole segment.
      sliding_window=0,
      init_std=0.02,
      # Encoder (BERT) switches, see the module docstring; the defaults are the pre-norm body.
      norm_position="pre",
      embed_norm=False,
      type_vocab_size=0,
  ))


PRESETS = {
    # Trains on 2 CPU cores in minutes; the vocabulary is the tiny world's sentencepiece model.
    "tiny": dict(vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 mlp_dim=384, max_length=256, tie_embeddings=True),
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
}


def model_config(name: str) -> ml_collections.ConfigDict:
  """Returns the model ConfigDict of preset `name` (see PRESETS)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  config = base_model_config()
  config.update(PRESETS[name])
  return config

"""Model configs of the Hugging Face checkpoints the paper recipes start from: exactly what
`python -m scripts.convert --from-hf DIR --to RUN` prints for them (models/convert/
families.py), so a recipe's `config.model` matches the converted run without overrides."""

import ml_collections

from configs.models import base_model_config

# Qwen/Qwen2.5-0.5B-Instruct (and -0.5B): config.json of the release.
QWEN25_05B = dict(vocab_size=151936, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2,
                  head_dim=64, mlp_dim=4864, norm="rmsnorm", norm_eps=1e-6, position="rope",
                  rope_theta=1000000.0, max_length=32768, activation="swiglu", qkv_bias=True,
                  tie_embeddings=True, dtype="bfloat16", remat="full")
# EleutherAI/pythia-2.8b is GPT-NeoX, which models/convert does not map; DPO's HH recipe
# runs here on Qwen2.5-0.5B (the HH figures of the paper are Pythia-2.8B's).

HF_MODELS = {"qwen2.5-0.5b": QWEN25_05B}


def hf_model_config(name: str) -> ml_collections.ConfigDict:
  """The model config of the Hugging Face checkpoint `name` (a key of HF_MODELS)."""
  if name not in HF_MODELS:
    raise ValueError(f"unknown checkpoint {name!r}; choose one of {sorted(HF_MODELS)}")
  config = base_model_config()
  config.update(HF_MODELS[name])
  return config

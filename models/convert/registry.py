"""Every HF family by model_type: families.py's (Llama, Mistral, Qwen2, GPT-2, BERT) and
families_moe.py's (Qwen3, Mixtral, Qwen3-MoE) and families_gemma.py's (Gemma 2, Gemma 3 text).
Import and export look families up here."""

from __future__ import annotations

from typing import Any

import ml_collections

from models.convert import families
from models.convert.families import Family
from models.convert.families_gemma import GEMMA_FAMILIES, infer_gemma_family
from models.convert.families_moe import MOE_FAMILIES, infer_moe_family

FAMILIES: dict[str, Family] = {**families.FAMILIES, **MOE_FAMILIES, **GEMMA_FAMILIES}


def family_for_hf(hf_config: dict[str, Any]) -> Family:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"HF model_type {model_type!r} is not supported; choose one of "
                     f"{sorted(FAMILIES)}")
  return FAMILIES[model_type]


def infer_family(cfg: ml_collections.ConfigDict, kind: str = "decoder") -> Family:
  """The HF family that represents `config.model` of our model `kind`."""
  if kind != "encoder":
    # Gemma first: Gemma 3's q/k norm would otherwise read as Qwen3's.
    family = infer_gemma_family(cfg) or infer_moe_family(cfg)
    if family is not None:
      return family
  return families.infer_family(cfg, kind)

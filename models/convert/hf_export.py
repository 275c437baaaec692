"""Our params -> a Hugging Face folder `transformers` loads (config.json + safetensors).

Streaming: `write_hf` asks for one of our params at a time (`read(path)`, e.g. a run's
checkpoint read leaf by leaf: training/hf_runs.py `export_hf`), turns it into HF tensors layer
by layer and hands them to `HFWriter`, which keeps at most one safetensors shard in memory.
Reading runs (checkpoints, LoRA merging, tokenizers) is the caller's: this package only maps
tensors and configs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from models.convert import heads, layout
from models.convert.families import Family
from models.convert.hf_import import body_maps, check_kind
from models.convert.registry import FAMILIES, infer_family
from models.convert.safetensors_io import HFWriter

def hf_config_for(model_cfg: ml_collections.ConfigDict, family: Family, kind: str, dtype: str,
                  special_ids: dict[str, int | None],
                  label_names: Sequence[str] = ()) -> dict[str, Any]:
  config = family.write_config(model_cfg)
  config.update(heads.hf_head_fields(kind, family.architecture, model_cfg, label_names))
  config.update(dtype=dtype, torch_dtype=dtype, **special_ids)
  return config


def write_hf(read: Callable[[tuple], np.ndarray], shapes: Any,
             model_cfg: ml_collections.ConfigDict, hf_dir: str, *, kind: str,
             family: str | None = None, dtype: str | None = None,
             special_ids: dict[str, int | None] | None = None,
             max_shard_bytes: int = 5 << 30,
             label_names: Sequence[str] = ()) -> dict[str, Any]:
  """Writes params as an HF folder: config.json and safetensors (no tokenizer files).

  Args:
    read: `read(path) -> np.ndarray`, one of our params by its path in `shapes`.
    shapes: our params' shapes (models/build.py `ModelSpec.shapes`) of `model_cfg`, `kind`.
    model_cfg: our model config.
    hf_dir: output folder.
    kind: our model kind (decoder | reward | encoder | classifier | encoder_classifier).
    family: HF model_type to write (llama | mistral | qwen2 | qwen3 | mixtral |
      qwen3_moe | gemma2 | gemma3_text | gpt2 | bert); None infers it.
    dtype: stored dtype ("float32", "bfloat16", ...); None keeps `param_dtype`.
    special_ids: bos / eos / pad token ids for the HF config.
    max_shard_bytes: safetensors shard size.
    label_names: a classifier's label names by id (HF's id2label; default LABEL_i).

  Returns:
    The HF config written.
  """
  fam = FAMILIES[family] if family else infer_family(model_cfg, kind)
  check_kind(fam, kind)
  dtype = dtype or model_cfg.param_dtype
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  scanned = bool(model_cfg.scan_layers)
  maps = body_maps(fam, model_cfg, kind) + heads.head_maps(kind, shapes)
  with HFWriter(hf_dir, max_shard_bytes) as writer:
    for m in maps:
      layers = [None] if not m.per_layer else range(model_cfg.num_layers)
      if m.per_layer and scanned:
        stacks = [read(layout.leaf_path(m, j, None, True)) for j in range(len(m.ours))]
      for layer in layers:
        if m.per_layer and scanned:
          ours = [s[layer] for s in stacks]
        else:
          ours = [read(layout.leaf_path(m, j, layer, scanned)) for j in range(len(m.ours))]
        for name, array in zip(layout.hf_names(m, layer), layout.to_hf(m, ours)):
          writer.add(name, np.asarray(array, np_dtype))
      stacks = None
  hf_config = hf_config_for(model_cfg, fam, kind, dtype, special_ids or {}, label_names)
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  logging.info("wrote %s (%s, kind %s)", hf_dir, fam.name, kind)
  return hf_config

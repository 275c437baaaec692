"""Run directory (config.json + orbax checkpoint) -> Hugging Face folder `transformers` loads.

Streaming: params are restored one of our params at a time (orbax partial restore), turned
into HF tensors layer by layer and handed to `HFWriter`, which keeps at most one safetensors
shard in memory. A LoRA run (its config has `lora.enabled`) is exported merged: each target
weight is restored from the base checkpoint (`init_from`), its adapters from the run, and
W + (alpha / r) A @ B is written.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import models  # noqa: F401  (flax variable-sharding mode)
from configs.models import _base as base_model_config
from models import lora as lora_lib
from models.build import build_model_spec
from models.convert import heads, layout
from models.convert.families import FAMILIES, Family, infer_family
from models.convert.hf_import import TOKENIZER_FILES, body_maps, check_kind
from models.convert.safetensors_io import HFWriter
from training.checkpoint import Checkpointer
from training.metrics import CONFIG_FILE


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The run's config.json, with `model` completed by today's defaults (older runs lack newer
  fields such as `rope_scaling`)."""
  with open(os.path.join(run_dir, CONFIG_FILE), encoding="utf-8") as f:
    config = json.load(f)
  model = base_model_config()
  scaling = config["model"].pop("rope_scaling", None)
  model.update(config["model"])
  if scaling:
    model.rope_scaling.update(scaling)
  config["model"] = model
  return ml_collections.ConfigDict(config)


def run_kind(config: ml_collections.ConfigDict) -> str:
  """Our model kind of a run: from a converted dir's stage ("convert:KIND") or the stage."""
  stage = config.get("stage", "")
  if stage.startswith("convert:"):
    return stage.split(":", 1)[1]
  from training.stages import get_stage  # the stage registry pulls in the data pipeline
  return get_stage(config.objective.name).model_kind


class ParamSource:
  """Reads one of our params at a time from a run's latest checkpoint (merging LoRA)."""

  def __init__(self, run_dir: str, config: ml_collections.ConfigDict, kind: str):
    self.run_dir = run_dir
    self.spec = build_model_spec(config.model, kind)
    self.device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self.lora = None
    if lora_lib.is_enabled(config):
      if not config.init_from:
        raise ValueError(f"{run_dir}: a LoRA run without init_from has no base to merge into")
      self.lora = lora_lib.make_lora_spec(self.spec, config.lora)
      self.base_dir = config.init_from
      self.targets = {t.path: t for t in self.lora.targets}

  def _restore(self, directory: str, shapes: Any, path: tuple) -> np.ndarray:
    leaf = layout.get_path(shapes, path)
    target: dict = {}
    layout.set_path(target, path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                       sharding=self.device))
    restored = Checkpointer.restore_params(directory, target)
    return np.asarray(jax.device_get(layout.get_path(restored, path)))

  def get(self, path: tuple) -> np.ndarray:
    if self.lora is None:
      return self._restore(self.run_dir, self.spec.shapes, path)
    if path[0] in self.lora.heads:  # trained in full by the LoRA run
      return self._restore(self.run_dir, self.lora.shapes, path)
    base = self._restore(self.base_dir, self.spec.shapes, path)
    if path not in self.targets:
      return base
    a = self._restore(self.run_dir, self.lora.shapes, path + ("a",))
    b = self._restore(self.run_dir, self.lora.shapes, path + ("b",))
    t = self.targets[path]
    return np.asarray(base + lora_lib.lora_delta(a, b, base.shape, t.n_stack, self.lora.scale))


def hf_config_for(model_cfg: ml_collections.ConfigDict, family: Family, kind: str, dtype: str,
                  special_ids: dict[str, int | None]) -> dict[str, Any]:
  config = family.write_config(model_cfg)
  config.update(heads.hf_head_fields(kind, family.architecture))
  config.update(dtype=dtype, torch_dtype=dtype, **special_ids)
  return config


def _special_ids(tokenizer_dir: str) -> dict[str, int | None]:
  """bos / eos / pad ids of the run's tokenizer (HF's SequenceClassification heads find the
  last real token through pad_token_id)."""
  if not tokenizer_dir:
    return {}
  from data.tokenizer import load_tokenizer  # sentencepiece / tokenizers only when needed
  tok = load_tokenizer(tokenizer_dir)
  return dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def _tokenizer_dir(run_dir: str, config: ml_collections.ConfigDict) -> str:
  path = config.data.get("tokenizer", "") if "data" in config else ""
  if path:
    return path if os.path.isdir(path) else os.path.dirname(path)
  own = os.path.join(run_dir, "tokenizer")
  return own if os.path.isdir(own) else ""


def export_hf(run_dir: str, hf_dir: str, *, family: str | None = None, kind: str | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 << 30) -> dict[str, Any]:
  """Writes the run's params as an HF folder (config.json, safetensors, tokenizer files).

  Args:
    run_dir: a converted directory or a training run's workdir (its latest checkpoint).
    hf_dir: output folder.
    family: HF model_type to write (llama | mistral | qwen2 | gpt2 | bert); None infers it.
    kind: our model kind; None reads it from the run's config.
    dtype: stored dtype ("float32", "bfloat16", ...); None keeps `param_dtype`.
    max_shard_bytes: safetensors shard size.

  Returns:
    The HF config written.
  """
  config = load_run_config(run_dir)
  model_cfg = config.model
  kind = kind or run_kind(config)
  fam = FAMILIES[family] if family else infer_family(model_cfg, kind)
  check_kind(fam, kind)
  dtype = dtype or model_cfg.param_dtype
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  source = ParamSource(run_dir, config, kind)
  scanned = bool(model_cfg.scan_layers)
  maps = body_maps(fam, model_cfg, kind) + heads.head_maps(kind, source.spec.shapes)
  with HFWriter(hf_dir, max_shard_bytes) as writer:
    for m in maps:
      layers = [None] if not m.per_layer else range(model_cfg.num_layers)
      if m.per_layer and scanned:
        stacks = [source.get(layout.leaf_path(m, j, None, True)) for j in range(len(m.ours))]
      for layer in layers:
        if m.per_layer and scanned:
          ours = [s[layer] for s in stacks]
        else:
          ours = [source.get(layout.leaf_path(m, j, layer, scanned)) for j in range(len(m.ours))]
        for name, array in zip(layout.hf_names(m, layer), layout.to_hf(m, ours)):
          writer.add(name, np.asarray(array, np_dtype))
      stacks = None
  tokenizer_dir = _tokenizer_dir(run_dir, config)
  hf_config = hf_config_for(model_cfg, fam, kind, dtype, _special_ids(tokenizer_dir))
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  for name in TOKENIZER_FILES:
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, name)):
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(hf_dir, name))
  logging.info("exported %s (%s, kind %s) to %s", run_dir, fam.name, kind, hf_dir)
  return hf_config

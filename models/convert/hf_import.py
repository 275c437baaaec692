"""Hugging Face folder -> our model config and params (training/hf_runs.py `import_hf` writes
them as a run directory).

Streaming: the HF shards are memory-mapped and read one tensor at a time, in our params' order.
A per-layer param of a scanned model is filled layer by layer into one host buffer. Without a
mesh the buffers are the converted params (host numpy arrays, written by orbax as they are);
with a mesh each buffer is placed onto its target sharding (`jax.make_array_from_callback`:
each device copies only its own block) and dropped, and orbax writes each device's shards.
Host memory peaks near one copy of the model plus one stacked param, never two copies.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import models  # noqa: F401  (flax variable-sharding mode)
from configs.models import base_model_config
from models.build import build_model_spec
from models.convert import heads, layout
from models.convert.families import Family, family_for_hf
from models.convert.safetensors_io import HFReader
from parallel.rules import tree_shardings

# Tokenizer files copied from the HF folder into `{out}/tokenizer/` (data/tokenizer.py
# `load_tokenizer` reads that folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def model_config_from_hf(hf_config: dict[str, Any], *, param_dtype: str = "float32",
                         scan_layers: bool = True) -> ml_collections.ConfigDict:
  """`config.model` for an HF config (every other field at its `configs/models.py` default)."""
  family = family_for_hf(hf_config)
  fields = family.read_config(hf_config)
  cfg = base_model_config()
  scaling = fields.pop("rope_scaling", None)
  cfg.update(fields)
  if scaling:
    cfg.rope_scaling.update(scaling)
  cfg.param_dtype = param_dtype
  cfg.scan_layers = scan_layers
  window = hf_config.get("sliding_window")
  if window and hf_config.get("model_type") == "mistral":
    cfg.sliding_window = int(window)  # every layer: the decoder applies it (models/attention.py)
  elif window and hf_config.get("use_sliding_window"):
    # Qwen2 windows only its layers from max_window_layers on; the decoder has one setting.
    logging.warning("%s uses sliding-window attention (%d tokens); this decoder attends to the "
                    "whole row, which is the same only for sequences up to %d tokens.",
                    hf_config["model_type"], window, window)
  return cfg


def _resolve_names(reader: HFReader, family: Family) -> dict[str, str]:
  """Canonical HF name -> name in the files: also accepts checkpoints saved without the
  family's leading scope (e.g. GPT-2's `h.0.ln_1.weight` for `transformer.h.0.ln_1.weight`)
  and older spellings (`family.canonical`, e.g. BERT's `LayerNorm.gamma`)."""
  names = {}
  for name in reader.keys():
    canonical = family.canonical(name)
    if family.prefix and not canonical.startswith(family.prefix) and not canonical.startswith(
        ("lm_head.", "score.")):
      canonical = family.prefix + canonical
    names[canonical] = name
  return names


def check_kind(family: Family, kind: str) -> None:
  """An encoder family's tables fill an encoder, a decoder family's a decoder or its heads."""
  if (kind == "encoder") != (family.kind == "encoder"):
    raise ValueError(f"HF family {family.name!r} converts to/from our {family.kind!r} models, "
                     f"not {kind!r}")


def body_maps(family: Family, model_cfg: ml_collections.ConfigDict, kind: str) -> list:
  """The family's table for our model `kind` (a head model has no LM head)."""
  maps = family.tensor_maps(model_cfg)
  if not heads.has_lm_head(kind):
    maps = [m for m in maps if m.ours != (("lm_head",),)]
  return maps


def _placer(shardings: Any | None):
  def place(array: np.ndarray, path: tuple) -> jax.Array | np.ndarray:
    if shardings is None:
      # Kept on the host: orbax writes numpy arrays as they are (no device copy), and
      # `restore_params` reads them back as jax.Arrays onto any sharding.
      return array
    sharding = layout.get_path(shardings, path)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
  return place


def convert_hf_params(hf_dir: str, model_cfg: ml_collections.ConfigDict, family: Family, *,
                      kind: str = "decoder", mesh: jax.sharding.Mesh | None = None,
                      rules: Any = None) -> dict:
  """Reads the HF tensors of `hf_dir` into our params (sharded over `mesh` by `rules`).

  Raises:
    ValueError: an HF tensor no table entry reads, or one of our params no entry fills.
  """
  spec = build_model_spec(model_cfg, kind)
  scanned = bool(model_cfg.scan_layers)
  dtype = np.dtype(jax.numpy.dtype(model_cfg.param_dtype))
  shardings = (tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
               if mesh is not None else None)
  place = _placer(shardings)
  maps = body_maps(family, model_cfg, kind) + heads.head_maps(kind, spec.shapes)
  params: dict = {}
  with HFReader(hf_dir) as reader:
    files = _resolve_names(reader, family)
    used = set()

    def read(m, layer):
      names = layout.hf_names(m, layer)
      missing = [n for n in names if n not in files]
      if missing:
        raise ValueError(f"{hf_dir}: missing HF tensors {missing}")
      used.update(names)
      return [reader.get(files[n]) for n in names]

    for m in maps:
      shapes = [layout.layer_shape(spec.shapes, m, j, scanned) for j in range(len(m.ours))]
      if not m.per_layer or not scanned:
        for layer in (range(model_cfg.num_layers) if m.per_layer else [None]):
          for j, array in enumerate(layout.to_ours(m, read(m, layer), shapes)):
            path = layout.leaf_path(m, j, layer, scanned)
            layout.set_path(params, path, place(np.asarray(array, dtype), path))
        continue
      buffers = [np.empty((model_cfg.num_layers,) + s, dtype) for s in shapes]
      for layer in range(model_cfg.num_layers):
        for buffer, array in zip(buffers, layout.to_ours(m, read(m, layer), shapes)):
          buffer[layer] = array
      for j, buffer in enumerate(buffers):
        path = layout.leaf_path(m, j, None, scanned)
        layout.set_path(params, path, place(buffer, path))
      del buffers
    tied_head = model_cfg.tie_embeddings and heads.has_lm_head(kind)
    unused = sorted(n for n in files if n not in used and not family.ignored(n)
                    and not (tied_head and n == "lm_head.weight"))
    if unused:
      raise ValueError(f"{hf_dir}: HF tensors with no place in the {kind} model: {unused[:8]}"
                       f"{' ...' if len(unused) > 8 else ''}")
  expected = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(spec.shapes)}
  got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  if expected != got:
    raise ValueError(f"params not filled by the {family.name} table: {sorted(expected - got)}; "
                     f"unexpected: {sorted(got - expected)}")
  return params

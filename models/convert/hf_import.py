"""Hugging Face folder -> this codebase's run directory (config.json + orbax checkpoint).

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
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import models  # noqa: F401  (flax variable-sharding mode)
from configs.base import base_config
from configs.models import _base as base_model_config
from models.build import build_model_spec
from models.convert import heads, layout
from models.convert.families import Family, family_for_hf
from models.convert.safetensors_io import HFReader
from parallel.rules import tree_shardings
from training.checkpoint import Checkpointer, checkpoint_dir
from training.metrics import CONFIG_FILE

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


def save_params(out_dir: str, params: dict) -> str:
  """Writes `{"params": params}` as step 0 of `{out_dir}/checkpoints`, as a run would."""
  with Checkpointer(checkpoint_dir(out_dir), max_to_keep=1, save_every=0,
                    async_save=False) as ckpt:
    ckpt.save(0, {"params": params}, force=True)
  return os.path.join(checkpoint_dir(out_dir), "0")


def write_run_config(out_dir: str, model_cfg: ml_collections.ConfigDict, kind: str,
                     tokenizer: str) -> None:
  """`{out_dir}/config.json`: a full config (as a training run writes one) with this model."""
  config = base_config()
  config.stage = f"convert:{kind}"
  config.model = model_cfg
  config.data.tokenizer = tokenizer
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    f.write("\n")


def copy_tokenizer(hf_dir: str, out_dir: str) -> str:
  """Copies the HF folder's tokenizer files into `{out_dir}/tokenizer/`; '' if it has none."""
  files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, f))]
  if not any(f in files for f in ("tokenizer.json", "tokenizer.model")):
    return ""
  target = os.path.join(out_dir, "tokenizer")
  os.makedirs(target, exist_ok=True)
  for f in files:
    shutil.copyfile(os.path.join(hf_dir, f), os.path.join(target, f))
  return target


def import_hf(hf_dir: str, out_dir: str, *, kind: str | None = None,
              param_dtype: str = "float32", scan_layers: bool = True,
              mesh: jax.sharding.Mesh | None = None, rules: Any = None
              ) -> ml_collections.ConfigDict:
  """Converts a local HF model folder into a run directory stages start from.

  Args:
    hf_dir: folder with config.json and model.safetensors (or shards + index).
    out_dir: written: `config.json`, `checkpoints/0/` (params), `tokenizer/` when present.
    kind: our model kind; None picks "reward" for a `*ForSequenceClassification` with one
      label and "decoder" otherwise.
    param_dtype: stored dtype of the params (training restores into its own dtype).
    scan_layers: layout of the block params (must match the stage's `config.model`).
    mesh, rules: write the params sharded for this mesh (None: one device).

  Returns:
    The `config.model` of the converted model.
  """
  hf_config = read_hf_config(hf_dir)
  family = family_for_hf(hf_config)
  kind = kind or heads.kind_of_hf(hf_config, family.kind)
  check_kind(family, kind)
  model_cfg = model_config_from_hf(hf_config, param_dtype=param_dtype, scan_layers=scan_layers)
  os.makedirs(out_dir, exist_ok=True)
  params = convert_hf_params(hf_dir, model_cfg, family, kind=kind, mesh=mesh, rules=rules)
  save_params(out_dir, params)
  del params
  tokenizer = copy_tokenizer(hf_dir, out_dir)
  write_run_config(out_dir, model_cfg, kind, tokenizer)
  logging.info("converted %s (%s, kind %s) into %s", hf_dir, family.name, kind, out_dir)
  return model_cfg

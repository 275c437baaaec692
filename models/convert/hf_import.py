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
from models.convert.absent_heads import (absent_head_maps, describe_absent, fresh_param,
                                         head_of)
from models.convert.errors import ConversionError
from models.convert.families import ENCODER_KINDS, Family
from models.convert.registry import family_for_hf
from models.convert.safetensors_io import HFReader
from parallel.rules import tree_shardings

# Tokenizer files copied from the HF folder into `{out}/tokenizer/` (data/tokenizer.py
# `load_tokenizer` reads that folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: cannot read the model's config ({e})") from None


def hf_model_config(hf_dir: str, hf_config: dict[str, Any], **kwargs
                    ) -> ml_collections.ConfigDict:
  """`model_config_from_hf` with any config problem as a ConversionError naming the file."""
  try:
    return model_config_from_hf(hf_config, **kwargs)
  except ConversionError:
    raise
  except KeyError as e:
    raise ConversionError(f"{hf_dir}/config.json: no field {e}") from None
  except ValueError as e:
    raise ConversionError(f"{hf_dir}/config.json: {e}") from None


def model_config_from_hf(hf_config: dict[str, Any], *, param_dtype: str = "float32",
                         scan_layers: bool = True, kind: str | None = None,
                         num_labels: int | None = None) -> ml_collections.ConfigDict:
  """`config.model` for an HF config (every other field at its `configs/models.py` default)
  as our model `kind` (None: inferred from the HF architecture); a classifier kind adds its
  head's fields, with `num_labels` (None: the HF config's) outputs."""
  family = family_for_hf(hf_config)
  fields = family.read_config(hf_config)
  fields.update(heads.head_config(hf_config, kind or heads.kind_of_hf(hf_config, family.kind),
                                  num_labels))
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
        family.heads):
      canonical = family.prefix + canonical
    names[canonical] = name
  return names


def check_kind(family: Family, kind: str) -> None:
  """An encoder family's tables fill an encoder, a decoder family's a decoder or its heads."""
  if (kind in ENCODER_KINDS) != (family.kind in ENCODER_KINDS):
    raise ValueError(f"HF family {family.name!r} converts to/from our {family.kind!r} models, "
                     f"not {kind!r}")


def body_maps(family: Family, model_cfg: ml_collections.ConfigDict, kind: str) -> list:
  """The family's table for our model `kind` (a head model has no LM head)."""
  maps = family.tensor_maps(model_cfg)
  if not heads.has_lm_head(kind):
    maps = [m for m in maps if not heads.is_lm_head(m)]
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

  A head the checkpoint lacks (a base model) starts fresh, one the kind has no place for is
  dropped, each with a log line (models/convert/absent_heads.py).

  Raises:
    ConversionError: an HF tensor no table entry reads, a missing or misshapen tensor, or one
      of our params no entry fills; the message names the file and the tensor.
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
    absent = absent_head_maps(maps, family, files)
    if absent:
      logging.info("%s has no %s head (a base model): initialised fresh: %s", hf_dir,
                   ", ".join(sorted({head_of(family, n) for m in absent for n in m.hf})),
                   describe_absent(absent))
    for m in absent:
      for j, path in enumerate(m.ours):
        shape = layout.layer_shape(spec.shapes, m, j, scanned)
        layout.set_path(params, path, place(fresh_param(path, shape, dtype, model_cfg.init_std),
                                            path))
    maps = [m for m in maps if m not in absent]

    def read(m, layer):
      names = layout.hf_names(m, layer)
      missing = [n for n in names if n not in files]
      if missing:
        where = "" if layer is None else f" of layer {layer}"
        raise ConversionError(f"{hf_dir}: missing HF tensor {missing[0]} (for our "
                              f"{'/'.join(m.ours[0])}{where})")
      used.update(names)
      return [reader.get(files[n]) for n in names]

    def convert(m, layer, shapes):
      arrays = read(m, layer)
      try:
        return layout.to_ours(m, arrays, shapes)
      except ValueError:
        name = layout.hf_names(m, layer)[0]
        raise ConversionError(
            f"{reader.file_of(files[name])}: tensor {files[name]} has shape "
            f"{tuple(arrays[0].shape)}, which does not fit our {'/'.join(m.ours[0])} "
            f"{shapes[0]} (config.json disagrees with the weights)") from None

    for m in maps:
      shapes = [layout.layer_shape(spec.shapes, m, j, scanned) for j in range(len(m.ours))]
      if not m.per_layer or not scanned:
        for layer in (range(model_cfg.num_layers) if m.per_layer else [None]):
          for j, array in enumerate(convert(m, layer, shapes)):
            path = layout.leaf_path(m, j, layer, scanned)
            layout.set_path(params, path, place(np.asarray(array, dtype), path))
        continue
      buffers = [np.empty((model_cfg.num_layers,) + s, dtype) for s in shapes]
      for layer in range(model_cfg.num_layers):
        for buffer, array in zip(buffers, convert(m, layer, shapes)):
          buffer[layer] = array
      for j, buffer in enumerate(buffers):
        path = layout.leaf_path(m, j, None, scanned)
        layout.set_path(params, path, place(buffer, path))
      del buffers
    tied_head = model_cfg.tie_embeddings and heads.has_lm_head(kind)
    unused = sorted(n for n in files if n not in used and not family.ignored(n)
                    and not (tied_head and n == "lm_head.weight"))
    # A head of another kind (the LM head under a reward model): dropped, as HF drops it.
    mapped_heads = {head_of(family, n) for m in maps + absent for n in m.hf}
    dropped = [n for n in unused if head_of(family, n) not in (None, *mapped_heads)]
    if dropped:
      logging.info("%s: the %s model has no place for %s: dropped", hf_dir, kind, dropped)
    unused = [n for n in unused if n not in dropped]
    if unused:
      more = f" (and {len(unused) - 1} more: {unused[1:8]})" if unused[1:] else ""
      raise ConversionError(f"{reader.file_of(files[unused[0]])}: HF tensor {files[unused[0]]} "
                            f"has no place in the {family.name} {kind} model{more}")
  expected = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(spec.shapes)}
  got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  if expected != got:
    raise ConversionError(f"{hf_dir}: params not filled by the {family.name} table: "
                          f"{sorted(expected - got)}; unexpected: {sorted(got - expected)}")
  return params

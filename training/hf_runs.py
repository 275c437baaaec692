"""Hugging Face folders <-> run directories: the run side of models/convert.

  import_hf(hf_dir, out_dir)   HF folder -> a run directory (config.json with the model kind,
                               checkpoints/0/ params, tokenizer/) that any stage starts from
                               with --config.init_from=out_dir, and that generate, chat and
                               evaluate load like a trained run (training/runs.py)
  export_hf(run, hf_dir)       a run's latest params (a LoRA run merged) -> config.json +
                               safetensors + tokenizer files for `transformers`

models/convert maps tensors and configs; this module reads and writes the run directory
(configs/run_layout.py) and its checkpoints (training/checkpoint.py).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import ml_collections
from absl import logging

from configs.base import base_config
from configs.run_layout import (TOKENIZER_DIR, checkpoint_dir, configured_tokenizer,
                                write_run_config)
from data.tokenizer import load_tokenizer
from models.convert import heads
from models.convert.registry import family_for_hf
from models.convert.hf_export import write_hf
from models.convert.errors import ConversionError
from models.convert.hf_import import (TOKENIZER_FILES, check_kind, convert_hf_params,
                                      hf_model_config, read_hf_config)
from training.checkpoint import Checkpointer
from training.runs import ParamReader


def save_params(out_dir: str, params: dict) -> str:
  """Writes `{"params": params}` as step 0 of `{out_dir}/checkpoints`, as a run would."""
  with Checkpointer(checkpoint_dir(out_dir), max_to_keep=1, save_every=0,
                    async_save=False) as ckpt:
    ckpt.save(0, {"params": params}, force=True)
  return os.path.join(checkpoint_dir(out_dir), "0")


def copy_tokenizer(hf_dir: str, out_dir: str) -> str:
  """Copies the HF folder's tokenizer files into `{out_dir}/tokenizer/`; '' if it has none."""
  files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, f))]
  if not any(f in files for f in ("tokenizer.json", "tokenizer.model")):
    return ""
  target = os.path.join(out_dir, TOKENIZER_DIR)
  os.makedirs(target, exist_ok=True)
  for f in files:
    shutil.copyfile(os.path.join(hf_dir, f), os.path.join(target, f))
  return target


def import_hf(hf_dir: str, out_dir: str, *, kind: str | None = None,
              param_dtype: str = "float32", scan_layers: bool = True,
              mesh: jax.sharding.Mesh | None = None, rules: Any = None,
              num_labels: int | None = None) -> ml_collections.ConfigDict:
  """Converts a local HF model folder into a run directory stages start from.

  Args:
    hf_dir: folder with config.json and model.safetensors (or shards + index).
    out_dir: written: `config.json`, `checkpoints/0/` (params), `tokenizer/` when present.
    kind: our model kind; None picks for a `*ForSequenceClassification` "reward" (one
      label) or "classifier" on a decoder family, "encoder_classifier" on BERT, else the
      family's LM ("decoder" or "encoder"). A classifier kind on an LM checkpoint (BERT's,
      GPT-2's) takes its body and starts its head fresh.
    param_dtype: stored dtype of the params (training restores into its own dtype).
    scan_layers: layout of the block params (must match the stage's `config.model`).
    mesh, rules: write the params sharded for this mesh (None: one device).
    num_labels: a classifier kind's outputs (None: the HF config's labels, HF's default 2).

  Returns:
    The `config.model` of the converted model.

  Raises:
    ConversionError: a config or tensor that does not convert (naming file and tensor).
  """
  hf_config = read_hf_config(hf_dir)
  try:
    family = family_for_hf(hf_config)
    kind = kind or heads.kind_of_hf(hf_config, family.kind)
    check_kind(family, kind)
  except ValueError as e:
    raise ConversionError(f"{hf_dir}/config.json: {e}") from None
  model_cfg = hf_model_config(hf_dir, hf_config, param_dtype=param_dtype,
                              scan_layers=scan_layers, kind=kind, num_labels=num_labels)
  os.makedirs(out_dir, exist_ok=True)
  params = convert_hf_params(hf_dir, model_cfg, family, kind=kind, mesh=mesh, rules=rules)
  save_params(out_dir, params)
  del params
  tokenizer = copy_tokenizer(hf_dir, out_dir)
  # A full config, as a training run writes one, with this model and tokenizer.
  config = base_config()
  config.stage = f"convert:{kind}"
  config.model = model_cfg
  config.data.tokenizer = tokenizer
  write_run_config(out_dir, config, kind)
  logging.info("converted %s (%s, kind %s) into %s", hf_dir, family.name, kind, out_dir)
  return model_cfg


def _tokenizer_dir(run: str, config: ml_collections.ConfigDict) -> str:
  """The folder holding the run's tokenizer files ('' when it has none)."""
  try:
    path = configured_tokenizer(run, config)
  except FileNotFoundError:
    return ""
  return path if os.path.isdir(path) else os.path.dirname(path)


def export_hf(run: str, hf_dir: str, *, family: str | None = None, kind: str | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 << 30) -> dict[str, Any]:
  """Writes the run's latest params as an HF folder (config.json, safetensors, tokenizer).

  Args:
    run: a converted directory or a training run's workdir (its latest checkpoint).
    hf_dir: output folder.
    family: HF model_type to write (llama | mistral | qwen2 | qwen3 | mixtral | qwen3_moe |
      gpt2 | bert); None infers it.
    kind: our model kind; None reads it from the run's config.
    dtype: stored dtype ("float32", "bfloat16", ...); None keeps `param_dtype`.
    max_shard_bytes: safetensors shard size.

  Returns:
    The HF config written.

  Raises:
    ConversionError: no checkpoint in `run`, or a model the family cannot represent.
  """
  try:
    return _export_hf(run, hf_dir, family=family, kind=kind, dtype=dtype,
                      max_shard_bytes=max_shard_bytes)
  except ConversionError:
    raise
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise ConversionError(f"{run}: {e}") from None


def _export_hf(run: str, hf_dir: str, *, family: str | None, kind: str | None,
               dtype: str | None, max_shard_bytes: int) -> dict[str, Any]:
  reader = ParamReader(run, kind)
  tokenizer_dir = _tokenizer_dir(run, reader.config)
  special_ids = {}
  if tokenizer_dir:
    # HF's SequenceClassification heads find the last real token through pad_token_id.
    tok = load_tokenizer(tokenizer_dir)
    special_ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id)
  # A classify run's label names (configs/classify.py data.label_names) become id2label.
  names = reader.config.get("data", {}).get("label_names", "")
  hf_config = write_hf(reader.get, reader.spec.shapes, reader.config.model, hf_dir,
                       kind=reader.kind, family=family, dtype=dtype, special_ids=special_ids,
                       max_shard_bytes=max_shard_bytes,
                       label_names=[n.strip() for n in names.split(",") if n.strip()])
  for name in TOKENIZER_FILES:
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, name)):
      shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(hf_dir, name))
  logging.info("exported %s to %s", run, hf_dir)
  return hf_config

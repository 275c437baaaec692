"""The layout of a run's directory: the one module that knows where a run keeps what.

    {workdir}/
        config.json        the run's whole config, plus `model_kind` (decoder | encoder |
                           reward): what its checkpoints hold, so no reader guesses it
        checkpoints/{step}/  orbax checkpoints (training/checkpoint.py)
        tokenizer/         spm.model (trained by data/pipeline.py) or tokenizer.json (a
                           converted Hugging Face model, training/hf_runs.py)
        metrics.jsonl      one JSON object per logged step (training/metrics.py)
        tensorboard/       TensorBoard event files
        data/              the tiny world's generated records (data/)

Any path of a run is accepted where a run is named: its workdir, its checkpoints directory or
one of its step directories (`run_dir` maps each to the workdir). Pure paths and JSON: every
layer (configs, data, models, training, scripts) may import this module. Loading a run's model
is training/runs.py `load_model`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

from configs.models import base_model_config

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
DATA_DIR = "data"
SPM_MODEL = "spm.model"
HF_TOKENIZER = "tokenizer.json"
MODEL_KINDS = ("decoder", "encoder", "reward")


def run_dir(path: str) -> str:
  """The workdir of a run given its workdir, its checkpoints dir or one of its step dirs."""
  path = os.path.normpath(path)
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == CHECKPOINTS_DIR:
    path = parent
  return os.path.dirname(path) if os.path.basename(path) == CHECKPOINTS_DIR else path


def checkpoint_dir(workdir: str) -> str:
  """Where a run in `workdir` keeps its checkpoints."""
  return os.path.join(workdir, CHECKPOINTS_DIR)


def tokenizer_dir(path: str) -> str:
  """The run's own tokenizer folder (which may not exist)."""
  return os.path.join(run_dir(path), TOKENIZER_DIR)


def tokenizer_path(path: str) -> str:
  """The tokenizer file of the run at `path` ('' for ''): its `tokenizer.json` when it has one
  and no sentencepiece model (a converted Hugging Face model), else its `spm.model`. The file
  need not exist yet (a run that trains its tokenizer writes it there)."""
  if not path:
    return ""
  folder = tokenizer_dir(path)
  hf, spm = os.path.join(folder, HF_TOKENIZER), os.path.join(folder, SPM_MODEL)
  return hf if os.path.exists(hf) and not os.path.exists(spm) else spm


def configured_tokenizer(path: str, config: ml_collections.ConfigDict) -> str:
  """The tokenizer a run was trained with: its `config.data.tokenizer` when set, else its own.

  Raises:
    FileNotFoundError: neither exists (names both places).
  """
  configured = config.data.get("tokenizer", "") if "data" in config else ""
  found = configured or tokenizer_path(path)
  if not os.path.exists(found):
    raise FileNotFoundError(f"tokenizer {found} not found (set data.tokenizer in "
                            f"{os.path.join(run_dir(path), CONFIG_FILE)}, or give the run a "
                            f"{TOKENIZER_DIR}/{SPM_MODEL} or {TOKENIZER_DIR}/{HF_TOKENIZER})")
  return found


def has_run_config(path: str) -> bool:
  return os.path.exists(os.path.join(run_dir(path), CONFIG_FILE))


def read_run_config(path: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (locked), from its `config.json`.

  Its `model` section is completed by today's defaults, so runs written before a model field
  existed (e.g. `rope_scaling`) load.

  Raises:
    FileNotFoundError: the run has no config.json (names the path).
  """
  file = os.path.join(run_dir(path), CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} not found: is {path!r} a training run's workdir?")
  with open(file, encoding="utf-8") as f:
    raw = json.load(f)
  if "model" in raw:
    model = base_model_config()
    scaling = raw["model"].pop("rope_scaling", None)
    model.update(raw["model"])
    if scaling:
      model.rope_scaling.update(scaling)
    raw["model"] = model
  config = ml_collections.ConfigDict(raw)
  config.lock()
  return config


def write_run_config(workdir: str, config: Mapping[str, Any] | ml_collections.ConfigDict,
                     model_kind: str) -> None:
  """Writes the run's `config.json`, recording the model kind its checkpoints hold."""
  if model_kind not in MODEL_KINDS:
    raise ValueError(f"unknown model kind {model_kind!r}; choose one of {MODEL_KINDS}")
  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  data["model_kind"] = model_kind
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, f"{CONFIG_FILE}.tmp{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def recorded_model_kind(config: ml_collections.ConfigDict) -> str | None:
  """The model kind a run's config records (None for runs written before it was recorded;
  training/runs.py then asks the stage registry)."""
  kind = config.get("model_kind", None)
  if kind:
    return kind
  stage = config.get("stage", "")
  return stage.split(":", 1)[1] if stage.startswith("convert:") else None

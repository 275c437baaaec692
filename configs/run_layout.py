"""The layout of a run's directory: the one module that knows where a run keeps what.

    {workdir}/
        config.json        the run's whole config, plus `model_kind` (decoder | encoder |
                           reward | classifier | encoder_classifier): what its checkpoints
                           hold, so no reader guesses it
        checkpoints/{step}/  orbax checkpoints (training/checkpoint.py)
        tokenizer/         spm.model (trained by data/pipeline.py) or tokenizer.json (a
                           converted Hugging Face model, training/hf_runs.py)
        config_history.jsonl  one line per resume that changed a config field: the step
                           the change took effect after and each field's old and new value
        .lock              who runs in this workdir now (training/workdir_lock.py)
        metrics.jsonl      one JSON object per logged step (training/metrics.py)
        tensorboard/       TensorBoard event files
        data/              the tiny world's generated records (data/)

Any path of a run is accepted where a run is named: its workdir, its checkpoints directory or
one of its step directories (`run_dir` maps each to the workdir). Pure paths and JSON: every
layer (configs, data, models, training, scripts) may import this module. Loading a run's model
is training/runs.py `load_model`.

A run's config may change between its attempts only where its checkpoints and data position
stay valid (`config_changes`): `config.json` always holds the latest config (what the next
resume is compared with, and what the run's later steps were trained with) and
`config_history.jsonl` the values each change replaced, from the step it took effect.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Mapping

import ml_collections

from configs.models import base_model_config

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
CONFIG_HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
DATA_DIR = "data"
SPM_MODEL = "spm.model"
HF_TOKENIZER = "tokenizer.json"
MODEL_KINDS = ("decoder", "encoder", "reward", "classifier", "encoder_classifier")


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


# Fields a resumed run may change: they steer how training goes on, not what the checkpoints
# hold or where the data stream stands. The mesh may change because checkpoints reshard on
# restore; `train.grad_accum_steps` because accumulation equals one big batch (training/step.py).
RESUMABLE_FIELDS = ("train", "optimizer", "checkpoint", "eval", "mesh", "lora.dropout",
                    "data.worker_count", "data.skip_invalid", "data.eval_files",
                    "data.eval_split", "data.replay_eval_files")
# Fields fixed for a run's life. model, lora, value and model_kind shape the checkpointed
# params, and train.trainable(_top_k) the optimizer state (moments of the trained params only);
# objective, reward and init_from (the frozen base / reference) define what is
# optimised; the tokenizer fixes the token ids. Every other data field (and `seed`, the
# shuffle seed) shapes the data chain, whose checkpointed iterator state is a position in that
# exact stream: another source, shuffle, sequence length or batch size would resume at a wrong
# position or repeat data. `rl` is the RL iteration's data (prompts, samples, lengths). A field
# in neither list is fixed too: a new section is frozen until someone decides otherwise.
FROZEN_FIELDS = ("stage", "seed", "init_from", "model", "model_kind", "objective", "lora",
                 "data", "rl", "reward", "value", "train.trainable", "train.trainable_top_k")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _resumable(field: str) -> bool:
  """Whether `field` (dotted) may change: the longest listed prefix decides, frozen if none."""
  def depth(prefixes):
    return max((len(p) for p in prefixes if field == p or field.startswith(p + ".")), default=-1)
  return depth(RESUMABLE_FIELDS) > depth(FROZEN_FIELDS)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """The fields that differ between a run's saved config and the config resuming it.

  Both are nested mappings as `config.json` holds them (a ConfigDict's `to_dict()`, with
  `model_kind`); tuples and lists compare equal. A field present on one side only comes from
  a code change, not from the command line (configs are locked), and counts as allowed.

  Returns:
    (forbidden, allowed): `{dotted field: (old, new)}` each, sorted by field; forbidden ones
    are frozen for the run's life (`FROZEN_FIELDS`), allowed ones `RESUMABLE_FIELDS`.
  """
  # JSON round trip: what config.json would hold (tuples -> lists, FieldReferences resolved).
  old_flat = _flat(json.loads(json.dumps(dict(old), default=str)))
  new_flat = _flat(json.loads(json.dumps(dict(new), default=str)))
  forbidden, allowed = {}, {}
  for field in sorted(old_flat.keys() | new_flat.keys()):
    before, after = old_flat.get(field), new_flat.get(field)
    if before == after:
      continue
    one_sided = field not in old_flat or field not in new_flat
    (allowed if one_sided or _resumable(field) else forbidden)[field] = (before, after)
  return forbidden, allowed


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
  """`a.b 1 -> 2, c 'x' -> 'y'`: changed fields on one line."""
  return ", ".join(f"{field} {json.dumps(old)} -> {json.dumps(new)}"
                   for field, (old, new) in changes.items())


def append_config_history(workdir: str, step: int,
                          changes: Mapping[str, tuple[Any, Any]]) -> None:
  """Records that from step `step + 1` on the run trains with `changes` (`{field: (old, new)}`)."""
  entry = {"step": step,
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "changes": {field: {"old": old, "new": new} for field, (old, new) in changes.items()}}
  with open(os.path.join(workdir, CONFIG_HISTORY_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, sort_keys=True) + "\n")


def read_config_history(path: str) -> list[dict[str, Any]]:
  """The run's config changes, oldest first: `{"step", "time", "changes": {field: {"old",
  "new"}}}` each; [] for a run never resumed with a change."""
  file = os.path.join(run_dir(path), CONFIG_HISTORY_FILE)
  if not os.path.exists(file):
    return []
  with open(file, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]

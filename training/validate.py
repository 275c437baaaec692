"""Config values that parse but cannot work, reported before anything is built.

A locked config rejects unknown keys; this catches known keys with unworkable values, which
would otherwise end in a ZeroDivisionError deep in the loop, a sharding error that does not
name the key, a run that exits 0 having done nothing, or (learned positions read past their
table) a loss that drifts to NaN. Every problem is one line naming the key, all at once:

    invalid config (2 problems):
      config.train.steps must be >= 1, got 0
      config.train.log_every must be >= 1, got 0

Stage configs differ (RL configs have `rl` and `eval`, supervised ones use the `data` batch),
so only keys the config has are checked.

The attention kernel is checked against the platform of the devices the run sees and the
stage's model (a decoder's causal layers, an encoder's bidirectional ones): a forced kernel
that cannot serve them (models/attention_kernels.py `kernel_problems`) is a problem here
rather than an error when the first step is traced.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from data.tools import TOOLSETS
from models.attention_kernels import kernel_problems
from models.decode_gemm import check_gemm
from models.quantize import WEIGHT_FORMATS
from parallel.mesh import mesh_shape
from parallel.rules import MESH_AXES, RULE_PRESETS
from training.registry import STAGES



class ConfigError(ValueError):
  """Config values that cannot work; `problems` holds one line per bad key."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    noun = "problem" if len(problems) == 1 else "problems"
    super().__init__(f"invalid config ({len(problems)} {noun}):\n  " + "\n  ".join(problems))


def _at_least(config, path: str, low: float, problems: list[str], *, strict: bool = False):
  """Appends a problem when `config.<path>` exists and is below `low` (or not above it)."""
  value = _get(config, path)
  if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
    return value
  if value < low or (strict and value == low):
    problems.append(f"config.{path} must be {'>' if strict else '>='} {low}, got {value}")
  return value


def _get(config, path: str):
  node = config
  for key in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      return None
    node = node[key]
  return node


def batch_ways(mesh_config, device_count: int, num_slices: int, problems: list[str]
               ) -> int | None:
  """How many ways the global batch splits over the mesh `mesh_config` resolves to on
  `device_count` devices in `num_slices` slices (parallel/mesh.py `mesh_shape`, the rules'
  `batch` axes); None, with a problem, if the mesh does not fit."""
  try:
    ici, dcn = mesh_shape(mesh_config, device_count, num_slices)
  except ValueError as e:  # its message names config.mesh and the sizes
    problems.append(str(e))
    return None
  rules = RULE_PRESETS.get(mesh_config.get("rules"))
  if rules is None:
    problems.append(f"config.mesh.rules: unknown {mesh_config.get('rules')!r}; choose one of "
                    f"{sorted(RULE_PRESETS)}")
    return None
  sizes = {axis: i * d for axis, i, d in zip(MESH_AXES, ici, dcn)}
  return math.prod(sizes[axis] for axis in rules["batch"])


def _devices() -> tuple[int, int]:
  devices = jax.devices()
  return len(devices), 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)


def attention_problems(config: ml_collections.ConfigDict, platform: str) -> list[str]:
  """config.model.attention against `platform` and the stage's model kind (module doc)."""
  if "model" not in config or "objective" not in config:
    return []
  stage = STAGES.get(config.objective.get("name"))
  causal = stage is None or "encoder" not in stage.model_kind
  return kernel_problems(config.model, causal=causal, platform=platform)


def rl_problems(config: ml_collections.ConfigDict, device_count: int | None,
                platform: str = "cpu") -> list[str]:
  """The rollout keys: staleness, importance cap, rollout devices, rollout weights
  (training/rl/offpolicy.py), the decode steps' products on `platform`
  (models/decode_gemm.py). Their types are the locked ConfigDict's to check."""
  problems: list[str] = []
  staleness = _at_least(config, "rl.staleness", 0, problems)
  _at_least(config, "rl.max_importance_ratio", 1, problems)
  weights = _get(config, "rl.rollout_weights")
  if weights is not None and weights not in WEIGHT_FORMATS:
    problems.append(f"config.rl.rollout_weights {weights!r}: choose one of {WEIGHT_FORMATS}")
  gemm = _get(config, "rl.decode_gemm")
  if gemm is not None:
    try:
      check_gemm(gemm, platform)
    except ValueError as e:
      problems.append(f"config.rl.decode_gemm: {e}")
  devices = _at_least(config, "rl.rollout_devices", 0, problems)
  if isinstance(devices, int) and devices > 0:
    if _get(config, "rl.tools"):
      problems.append("config.rl.rollout_devices > 0 with config.rl.tools: tool episodes "
                      "sample on the training mesh; set rollout_devices=0")
    if isinstance(staleness, int) and staleness == 0:
      problems.append("config.rl.rollout_devices > 0 needs config.rl.staleness >= 1: at "
                      "staleness 0 every rollout waits for the update before it, so the "
                      "rollout devices would idle while the others train")
    if device_count is None:
      device_count, _ = _devices()
    if devices >= device_count:
      problems.append(f"config.rl.rollout_devices {devices} leaves none of the "
                      f"{device_count} devices to train on")
    elif "mesh" in config:
      try:
        mesh_shape(config.mesh, device_count - devices)
      except ValueError as e:
        problems.append(f"config.rl.rollout_devices {devices}: the training mesh on the "
                        f"other {device_count - devices} devices does not fit: {e}")
  return problems


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None,
                    num_slices: int = 1, platform: str | None = None) -> list[str]:
  """Every unworkable value of `config`, one line each naming its key (empty: none found).

  Args:
    config: a stage config (configs/*.py `get_config`, overrides applied).
    device_count: devices the mesh is built on; None counts `jax.devices()` (and their
      slices), so a multi-host job must start jax.distributed first.
    num_slices: slices of `device_count` (with an explicit `device_count`).
    platform: the devices' platform ('cpu', 'gpu', 'tpu'); None: `jax.default_backend()`.
  """
  platform = platform or jax.default_backend()
  problems: list[str] = attention_problems(config, platform)
  rl = "rl" in config
  _at_least(config, "train.steps", 1, problems)
  _at_least(config, "train.log_every", 1, problems)
  eval_every = _at_least(config, "train.eval_every", 0, problems)
  if not rl and isinstance(eval_every, int) and eval_every > 0:
    # RL stages evaluate `eval.num_prompts` prompts; supervised ones `eval_steps` batches.
    _at_least(config, "train.eval_steps", 1, problems)
  accum = _at_least(config, "train.grad_accum_steps", 1, problems)
  _at_least(config, "optimizer.lr", 0, problems, strict=True)
  _at_least(config, "optimizer.warmup_steps", 0, problems)
  _at_least(config, "checkpoint.every_steps", 0, problems)
  _at_least(config, "checkpoint.max_to_keep", 1, problems)
  if _get(config, "lora.enabled"):
    _at_least(config, "lora.rank", 1, problems)
  seq_len = _at_least(config, "data.seq_len", 1, problems)
  learned = _get(config, "model.position") == "learned"
  max_length = _get(config, "model.max_length")
  if rl:
    prompt_len = _at_least(config, "rl.max_prompt_len", 1, problems)
    for path in ("rl.max_new_tokens", "eval.max_new_tokens"):
      new = _at_least(config, path, 1, problems)
      if learned and isinstance(prompt_len, int) and isinstance(new, int) and (
          prompt_len + new > max_length):
        problems.append(f"config.rl.max_prompt_len {prompt_len} + config.{path} {new} exceeds "
                        f"config.model.max_length {max_length} (learned positions)")
    if _get(config, "rl.tools"):
      _tool_problems(config, learned, max_length, problems)
    problems.extend(rl_problems(config, device_count, platform))
  elif learned and isinstance(seq_len, int) and seq_len > max_length:
    problems.append(f"config.data.seq_len {seq_len} exceeds config.model.max_length "
                    f"{max_length} (learned positions have no row for the later tokens)")
  batch = None if rl else _at_least(config, "data.global_batch_size", 1, problems)
  if isinstance(batch, int) and batch >= 1:
    if isinstance(accum, int) and accum >= 1 and batch % accum:
      problems.append(f"config.data.global_batch_size {batch} must be divisible by "
                      f"config.train.grad_accum_steps {accum}")
    if "mesh" in config:
      if device_count is None:
        device_count, num_slices = _devices()
      ways = batch_ways(config.mesh, device_count, num_slices, problems)
      if ways is not None and batch % ways:
        problems.append(f"config.data.global_batch_size {batch} must be divisible by the "
                        f"{ways} data-parallel ways of the mesh on {device_count} devices "
                        f"(config.mesh {' x '.join(RULE_PRESETS[config.mesh.rules]['batch'])}, "
                        "times their dcn_ sizes)")
  return problems


def _tool_problems(config: ml_collections.ConfigDict, learned: bool, max_length, problems
                   ) -> None:
  """Multi-turn tool episodes (`config.rl.tools`, training/rl/episodes.py)."""
  if config.rl.tools not in TOOLSETS:
    problems.append(f"config.rl.tools: unknown toolset {config.rl.tools!r}; choose one of "
                    f"{sorted(TOOLSETS)} ('' = off)")
  _at_least(config, "rl.max_turns", 1, problems)
  tokens = _at_least(config, "rl.max_episode_tokens", 1, problems)
  if _get(config, "reward.overlong_buffer"):
    problems.append("config.reward.overlong_buffer shapes single replies; it cannot be used "
                    "with config.rl.tools (episodes are capped by config.rl.max_episode_tokens)")
  # Each turn re-reads prompt + episode and samples up to max_new_tokens more.
  longest = max(_get(config, "rl.max_new_tokens") or 0, _get(config, "eval.max_new_tokens") or 0)
  total = config.rl.max_prompt_len + (tokens or 0) + longest - 1
  if learned and total > max_length:
    problems.append(f"config.rl.max_prompt_len + config.rl.max_episode_tokens + the longest "
                    f"reply - 1 = {total} exceeds config.model.max_length {max_length} "
                    "(learned positions)")


def check_config(config: ml_collections.ConfigDict, device_count: int | None = None,
                 num_slices: int = 1) -> None:
  """Raises `ConfigError` listing every problem `validate_config` finds."""
  problems = validate_config(config, device_count, num_slices)
  if problems:
    raise ConfigError(problems)

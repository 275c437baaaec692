"""configs/validate.py: unworkable values are reported one line per key, all at once."""

import os
import subprocess
import sys

import ml_collections
import pytest

from configs import ppo, pretrain
from training.validate import ConfigError, check_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(**overrides):
  """The tiny pretraining config with `section__key=value` overrides."""
  config = pretrain.get_config("tiny")
  for name, value in overrides.items():
    section, key = name.split("__")
    config[section][key] = value
  return config


def test_stage_presets_pass():
  assert validate_config(pretrain.get_config("tiny"), device_count=1) == []
  assert validate_config(pretrain.get_config("1b"), device_count=256) == []
  assert validate_config(ppo.get_config("tiny"), device_count=1) == []


@pytest.mark.parametrize("overrides, expected", [
    (dict(train__steps=0), "config.train.steps must be >= 1, got 0"),
    (dict(train__steps=-5), "config.train.steps must be >= 1, got -5"),
    (dict(train__log_every=0), "config.train.log_every must be >= 1, got 0"),
    (dict(train__eval_every=-1), "config.train.eval_every must be >= 0, got -1"),
    (dict(train__eval_steps=0), "config.train.eval_steps must be >= 1, got 0"),
    (dict(train__grad_accum_steps=0), "config.train.grad_accum_steps must be >= 1, got 0"),
    (dict(train__grad_accum_steps=3),
     "config.data.global_batch_size 16 must be divisible by config.train.grad_accum_steps 3"),
    (dict(data__global_batch_size=0), "config.data.global_batch_size must be >= 1, got 0"),
    (dict(data__seq_len=0), "config.data.seq_len must be >= 1, got 0"),
    (dict(optimizer__lr=0.0), "config.optimizer.lr must be > 0, got 0.0"),
    (dict(optimizer__warmup_steps=-1), "config.optimizer.warmup_steps must be >= 0, got -1"),
    (dict(checkpoint__every_steps=-1), "config.checkpoint.every_steps must be >= 0, got -1"),
    (dict(checkpoint__max_to_keep=0), "config.checkpoint.max_to_keep must be >= 1, got 0"),
    (dict(lora__enabled=True, lora__rank=0), "config.lora.rank must be >= 1, got 0"),
])
def test_each_bad_value_is_one_line_naming_its_key(overrides, expected):
  assert validate_config(tiny(**overrides), device_count=1) == [expected]


def test_unused_keys_are_not_checked():
  # eval_steps only matters when evaluating; the LoRA rank only when LoRA is on.
  assert validate_config(tiny(train__eval_every=0, train__eval_steps=0,
                              lora__rank=0), device_count=1) == []


def test_all_problems_at_once_in_one_error():
  config = tiny(train__steps=0, train__log_every=0, data__global_batch_size=0)
  with pytest.raises(ConfigError) as info:
    check_config(config, device_count=1)
  assert info.value.problems == ["config.train.steps must be >= 1, got 0",
                                 "config.train.log_every must be >= 1, got 0",
                                 "config.data.global_batch_size must be >= 1, got 0"]
  assert str(info.value).splitlines() == ["invalid config (3 problems):"] + [
      f"  {p}" for p in info.value.problems]


def test_batch_must_split_over_the_data_parallel_mesh_axes():
  (problem,) = validate_config(tiny(), device_count=3)  # data=-1 fills to 3 ways
  assert problem.startswith("config.data.global_batch_size 16 must be divisible by the 3 "
                            "data-parallel ways of the mesh on 3 devices")
  # 8 devices as data 2 x fsdp 2 x tensor 2: fsdp_tp splits the batch 4 ways, dp 8 ways.
  config = tiny(mesh__data=2, mesh__fsdp=2, mesh__tensor=2, data__global_batch_size=12)
  assert validate_config(config, device_count=8) == []
  config.mesh.rules = "dp"
  (problem,) = validate_config(config, device_count=8)
  assert "the 8 data-parallel ways" in problem and "data x fsdp x tensor" in problem
  # Across slices the dcn sizes multiply in: 2 slices of 4 devices, dcn_data=2 -> 8 ways.
  config = tiny(mesh__dcn_data=-1, data__global_batch_size=12)
  (problem,) = validate_config(config, device_count=8, num_slices=2)
  assert "the 8 data-parallel ways" in problem


def test_mesh_that_does_not_fit_the_devices():
  # parallel/mesh.py's own messages, which name config.mesh and the sizes.
  assert validate_config(tiny(mesh__data=2, mesh__fsdp=2), device_count=2) == [
      "config.mesh: axis sizes {'data': 2, 'fsdp': 2, 'tensor': 1} need 4 devices, have 2"]
  assert validate_config(tiny(mesh__fsdp=-1), device_count=2) == [
      "config.mesh: at most one axis may be -1, got [-1, -1, 1]"]
  assert validate_config(tiny(mesh__tensor=0), device_count=2) == [
      "config.mesh: axis sizes must be >= 1 or -1 (fill), got {'data': -1, 'fsdp': 1, "
      "'tensor': 0}"]


def test_learned_positions_must_cover_the_sequence():
  config = tiny(data__seq_len=512)
  assert validate_config(config, device_count=1) == []  # RoPE has no table to run off
  config.model.position = "learned"
  assert validate_config(config, device_count=1) == [
      "config.data.seq_len 512 exceeds config.model.max_length 256 (learned positions have no "
      "row for the later tokens)"]


def test_rl_checks_prompt_plus_reply_and_skips_the_supervised_batch():
  config = ppo.get_config("tiny")
  config.model.position = "learned"
  config.model.max_length = 48
  config.data.global_batch_size = 5  # the RL loop does not read it
  config.rl.max_new_tokens = 0
  assert validate_config(config, device_count=2) == [
      "config.rl.max_new_tokens must be >= 1, got 0",
      "config.rl.max_prompt_len 32 + config.eval.max_new_tokens 32 exceeds "
      "config.model.max_length 48 (learned positions)"]


def test_only_present_keys_are_checked():
  config = ml_collections.ConfigDict(dict(train=dict(steps=0), optimizer=dict(lr=-1.0)))
  assert validate_config(config, device_count=1) == [
      "config.train.steps must be >= 1, got 0", "config.optimizer.lr must be > 0, got -1.0"]


def test_train_cli_prints_every_problem_and_builds_nothing(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "scripts.train", "--config", "configs/pretrain.py:tiny",
         "--workdir", str(workdir), "--config.train.steps=0", "--config.train.log_every=0"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode != 0
  assert "error: invalid config (2 problems):" in result.stderr
  assert "config.train.steps must be >= 1" in result.stderr
  assert "config.train.log_every must be >= 1" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (workdir / "checkpoints").exists()

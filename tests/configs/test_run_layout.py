"""configs/run_layout.py: where a run keeps what, and reading its config back."""

import json
import os

import pytest

from configs import pretrain
from configs import ppo
from configs.run_layout import (CONFIG_FILE, append_config_history, config_changes,
                                configured_tokenizer, format_changes, read_config_history,
                                read_run_config, recorded_model_kind, run_dir, tokenizer_path,
                                write_run_config)


def test_any_path_of_a_run_names_its_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  assert run_dir(workdir) == workdir
  assert run_dir(os.path.join(workdir, "checkpoints")) == workdir
  assert run_dir(os.path.join(workdir, "checkpoints", "120")) == workdir
  assert run_dir(os.path.join(workdir, "checkpoints", "120") + "/") == workdir


def test_config_round_trip_records_the_model_kind_and_completes_model_defaults(tmp_path):
  config = pretrain.get_config("tiny")
  write_run_config(str(tmp_path), config, "reward")
  raw = json.loads((tmp_path / CONFIG_FILE).read_text())
  assert raw["model_kind"] == "reward"
  # An older run's config.json lacks newer model fields: they come back with today's default.
  del raw["model"]["rope_scaling"], raw["model"]["sliding_window"]
  (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
  loaded = read_run_config(os.path.join(str(tmp_path), "checkpoints", "3"))
  assert loaded.model.rope_scaling.type == "none" and loaded.model.sliding_window == 0
  assert loaded.model.d_model == config.model.d_model
  assert recorded_model_kind(loaded) == "reward"
  with pytest.raises(AttributeError):
    loaded.new_field = 1  # locked, as a config from the command line
  with pytest.raises(ValueError, match="unknown model kind 'critic'"):
    write_run_config(str(tmp_path), config, "critic")


def test_converted_and_legacy_runs(tmp_path):
  assert recorded_model_kind(pretrain.get_config("tiny")) is None  # nothing recorded
  config = pretrain.get_config("tiny")
  config.stage = "convert:encoder"
  assert recorded_model_kind(config) == "encoder"
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json not found"):
    read_run_config(str(tmp_path))


def test_tokenizer_of_a_run(tmp_path):
  folder = tmp_path / "tokenizer"
  folder.mkdir()
  assert tokenizer_path(str(tmp_path)) == str(folder / "spm.model")  # where it will be trained
  (folder / "tokenizer.json").write_text("{}")
  assert tokenizer_path(str(tmp_path / "checkpoints")) == str(folder / "tokenizer.json")
  (folder / "spm.model").write_bytes(b"")
  assert tokenizer_path(str(tmp_path)) == str(folder / "spm.model")
  assert tokenizer_path("") == ""
  config = pretrain.get_config("tiny")
  assert configured_tokenizer(str(tmp_path), config) == str(folder / "spm.model")
  config.data.tokenizer = str(tmp_path / "elsewhere.model")
  with pytest.raises(FileNotFoundError, match="elsewhere.model not found"):
    configured_tokenizer(str(tmp_path), config)


def _saved(config, kind="decoder"):
  return {**json.loads(json.dumps(config.to_dict())), "model_kind": kind}


def test_config_changes_splits_what_a_resume_may_change():
  old = pretrain.get_config("tiny")
  new = pretrain.get_config("tiny")
  assert config_changes(_saved(old), _saved(new)) == ({}, {})
  new.optimizer.lr, new.optimizer.schedule = 1e-3, "constant"
  new.train.steps, new.train.log_every, new.train.eval_every = 5000, 1, 7
  new.checkpoint.every_steps, new.mesh.fsdp, new.lora.dropout = 9, 2, 0.1
  new.data.worker_count = 4
  assert config_changes(_saved(old), _saved(new)) == ({}, {
      "checkpoint.every_steps": (old.checkpoint.every_steps, 9),
      "data.worker_count": (0, 4),
      "lora.dropout": (0.0, 0.1),
      "mesh.fsdp": (1, 2),
      "optimizer.lr": (old.optimizer.lr, 1e-3),
      "optimizer.schedule": (old.optimizer.schedule, "constant"),
      "train.eval_every": (old.train.eval_every, 7),
      "train.log_every": (old.train.log_every, 1),
      "train.steps": (old.train.steps, 5000)})


def test_config_changes_forbids_what_the_checkpoints_or_data_position_depend_on():
  old = pretrain.get_config("tiny")
  new = pretrain.get_config("tiny")
  new.model.d_model = 2 * old.model.d_model
  new.objective.z_loss = 1e-4
  new.data.tokenizer, new.data.seq_len, new.data.global_batch_size = "x.model", 64, 32
  new.lora.rank, new.seed, new.stage = 4, 1, "other"
  forbidden, allowed = config_changes(_saved(old), _saved(new, "reward"))
  assert allowed == {}
  assert forbidden == {
      "data.global_batch_size": (16, 32), "data.seq_len": (old.data.seq_len, 64),
      "data.tokenizer": ("", "x.model"), "lora.rank": (8, 4),
      "model.d_model": (old.model.d_model, 2 * old.model.d_model),
      "model_kind": ("decoder", "reward"), "objective.z_loss": (0.0, 1e-4), "seed": (0, 1),
      "stage": (old.stage, "other")}
  assert format_changes({"model.d_model": (64, 128), "data.tokenizer": ("", "x")}) == (
      'model.d_model 64 -> 128, data.tokenizer "" -> "x"')
  rl_old, rl_new = ppo.get_config("tiny"), ppo.get_config("tiny")
  rl_new.rl.samples_per_prompt, rl_new.eval.num_prompts = 8, 3
  assert config_changes(_saved(rl_old), _saved(rl_new)) == (
      {"rl.samples_per_prompt": (4, 8)}, {"eval.num_prompts": (rl_old.eval.num_prompts, 3)})


def test_config_changes_of_code_not_of_the_command_line_are_allowed():
  # A field the run's code did not have yet (or no longer has), tuples saved as lists.
  old = _saved(pretrain.get_config("tiny"))
  new = _saved(pretrain.get_config("tiny"))
  del old["data"]["pack_bins"]
  old["model"]["shape"], new["model"]["shape"] = [2, 3], (2, 3)
  new["data"]["brand_new"] = True
  assert config_changes(old, new) == ({}, {"data.brand_new": (None, True),
                                           "data.pack_bins": (None, new["data"]["pack_bins"])})


def test_config_history_appends_one_line_per_changed_resume(tmp_path):
  assert read_config_history(str(tmp_path)) == []
  append_config_history(str(tmp_path), 20, {"optimizer.lr": (3e-4, 1e-4)})
  append_config_history(str(tmp_path), 50, {"train.steps": (100, 200)})
  history = read_config_history(os.path.join(str(tmp_path), "checkpoints", "50"))
  assert [(h["step"], h["changes"]) for h in history] == [
      (20, {"optimizer.lr": {"old": 3e-4, "new": 1e-4}}),
      (50, {"train.steps": {"old": 100, "new": 200}})]
  assert history[0]["time"].endswith("+00:00")

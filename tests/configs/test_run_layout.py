"""configs/run_layout.py: where a run keeps what, and reading its config back."""

import json
import os

import pytest

from configs import pretrain
from configs.run_layout import (CONFIG_FILE, configured_tokenizer, read_run_config,
                                recorded_model_kind, run_dir, tokenizer_path, write_run_config)


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

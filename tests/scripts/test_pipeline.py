"""The pipeline's plan: stage order, init_from wiring, and the equivalent train commands."""

import pytest
from absl import app

from scripts.pipeline import PIPELINE, command, set_field, stage_plan


def test_plan_wires_each_stage_to_its_predecessor():
  plan = {name: overrides for name, _, _, overrides in stage_plan("runs/t", [p[0] for p in
                                                                            PIPELINE])}
  assert plan["pretrain"] == {}
  assert plan["sft"] == {"init_from": "runs/t/pretrain"}
  assert plan["dpo"] == {"init_from": "runs/t/sft"}
  assert plan["distill"] == {"objective.teacher": "runs/t/pretrain"}
  assert command("runs/t", "sft", "sft", "tiny", plan["sft"]) == [
      "python", "-m", "scripts.train", "--config=configs/sft.py:tiny",
      "--workdir=runs/t/sft", "--config.init_from=runs/t/pretrain"]


def test_every_stage_config_accepts_its_overrides():
  import importlib
  for name, module, preset, overrides in stage_plan("runs/t", [p[0] for p in PIPELINE]):
    config = importlib.import_module(f"configs.{module}").get_config(preset)
    for path, value in overrides.items():
      set_field(config, path, value)
    assert config.objective.name, name


def test_unknown_stage_and_key_are_errors():
  with pytest.raises(app.UsageError, match="unknown stages"):
    stage_plan("runs/t", ["pretrain", "rlhf"])
  from configs import pretrain
  with pytest.raises(KeyError, match="optimizer.lrr"):
    set_field(pretrain.get_config("tiny"), "optimizer.lrr", 1.0)


def test_a_run_of_some_stages_keeps_the_others_figures(tmp_path, monkeypatch):
  import json
  import os
  import scripts.pipeline
  from scripts.pipeline import run_pipeline

  def fake_run_stage(config, workdir):  # stands in for training: logs one held-out figure
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
      f.write(json.dumps({"step": 3, "eval/loss": 1.5, "train/loss": 2.0}) + "\n")
  monkeypatch.setattr(scripts.pipeline, "run_stage", fake_run_stage)
  (tmp_path / "summary.json").write_text(json.dumps(
      {"pretrain": {"eval/loss": 0.3}, "sft": {"eval/loss": 9.0}}))
  summary = run_pipeline(str(tmp_path), ["sft", "dpo"])
  want = {"pretrain": {"eval/loss": 0.3}, "sft": {"eval/loss": 1.5}, "dpo": {"eval/loss": 1.5}}
  assert summary == want and list(summary) == ["pretrain", "sft", "dpo"]
  assert json.loads((tmp_path / "summary.json").read_text()) == want

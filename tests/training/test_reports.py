"""Plots and reports: the figures carry exactly the metrics file's values, the PNGs are
valid images, and the HTML embeds them."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from training import plots
from training.eta import Countdown, format_duration
from training.metrics import read_metrics
from training.reports import pipeline_report, rl_table, run_report, sweep_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, records):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return str(path)


def train_records(scale):
  records = []
  for step in (10, 20, 30, 40):
    records.append({"step": step, "train/loss": scale * 4.0 / step, "train/lr": 1e-3 * step / 40,
                    "train/grad_norm": 1.0 + step / 100, "perf/tokens_per_sec": 900.0 + step})
  records[1].update({"eval/loss": scale * 0.3, "eval/accuracy": 0.5})
  records[3].update({"eval/loss": scale * 0.2, "eval/accuracy": 0.7})
  return records


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.size[0] > 100 and image.size[1] > 100


def test_curve_lines_are_the_metrics_files_values(tmp_path):
  a = write_run(tmp_path / "a", train_records(1.0))
  b = write_run(tmp_path / "b", train_records(2.0))
  runs = {"a": read_metrics(a), "b": read_metrics(b)}
  fig = plots.plot_curves(runs, ["train/loss", "eval/loss"], "loss")
  lines = fig.axes[0].get_lines()
  assert [l.get_label() for l in lines] == ["a: train/loss", "a: eval/loss", "b: train/loss",
                                            "b: eval/loss"]
  np.testing.assert_allclose(lines[1].get_xydata(), [[20, 0.3], [40, 0.2]])
  np.testing.assert_allclose(lines[2].get_xydata()[:, 1], [0.8, 0.4, 8 / 30, 0.2])
  panels = dict(plots.curve_panels(runs))
  assert panels["loss"] == ["train/loss", "eval/loss"]
  assert panels["held-out accuracy"] == ["eval/accuracy"]
  assert "reward" not in panels and "gradient norm" in panels


def test_run_report_writes_pngs_markdown_and_self_contained_html(tmp_path):
  a = write_run(tmp_path / "x" / "sft", train_records(1.0))
  b = write_run(tmp_path / "y" / "sft", train_records(2.0))
  md, page = run_report([a, b], str(tmp_path / "out"))
  pngs = sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".png"))
  assert pngs == ["runs_gradient_norm.png", "runs_held-out_accuracy.png",
                  "runs_learning_rate.png", "runs_loss.png", "runs_throughput.png"]
  for name in pngs:
    assert_png(tmp_path / "out" / name)
  text = open(md, encoding="utf-8").read()
  assert "x/sft" in text and "y/sft" in text and "![loss](runs_loss.png)" in text
  assert "| eval/loss | 0.2 | 0.4 |" in text  # last values, one column per run
  html_text = open(page, encoding="utf-8").read()
  assert html_text.count("data:image/png;base64,") == len(pngs) and "runs_loss.png\"" in html_text


def test_sweep_plot_one_field_line_and_two_fields_heatmap(tmp_path):
  rows = [{"run": "lr=0.01", "optimizer.lr": "0.01", "eval/loss": 2.5},
          {"run": "lr=0.001", "optimizer.lr": "0.001", "eval/loss": 2.0},
          {"run": "lr=0.1", "optimizer.lr": "0.1"}]
  fig = plots.plot_sweep(rows, ["optimizer.lr"], "eval/loss")
  xy = fig.axes[0].get_lines()[0].get_xydata()
  np.testing.assert_allclose(xy[:2], [[0.001, 2.0], [0.01, 2.5]])
  assert np.isnan(xy[2, 1]) and fig.axes[0].get_xscale() == "log"
  grid_rows = [{"run": f"{a},{b}", "a": a, "b": b, "m": float(10 * i + j)}
               for i, a in enumerate("xy") for j, b in enumerate("123")]
  fig2 = plots.plot_sweep(grid_rows, ["a", "b"], "m")
  np.testing.assert_array_equal(fig2.axes[0].get_images()[0].get_array(),
                                [[0, 1, 2], [10, 11, 12]])
  md, page = sweep_report(str(tmp_path), grid_rows, ["a", "b"], "m")
  assert_png(tmp_path / "sweep.png")
  assert "| 1 | x,1 | x | 1 | 0 |" in open(md, encoding="utf-8").read()


def test_pipeline_report_has_sections_commands_and_the_rl_table(tmp_path):
  write_run(tmp_path / "sft", train_records(1.0))
  write_run(tmp_path / "grpo", [
      {"step": 0, "eval/reward": 0.5, "eval/kl": 0.0, "eval/sampled_reward": 0.4},
      {"step": 5, "train/score": 0.6, "train/kl": 0.1},
      {"step": 10, "train/score": 0.7, "eval/reward": 0.55, "eval/kl": 0.2,
       "eval/sampled_reward": 0.45}])
  commands = [("sft", "python -m scripts.train --config=configs/sft.py:tiny"),
              ("grpo", "python -m scripts.train --config=configs/grpo.py:tiny")]
  md, page = pipeline_report(str(tmp_path), commands, {"sft": {"eval/loss": 0.2}})
  text = open(md, encoding="utf-8").read()
  assert "## sft" in text and "configs/grpo.py:tiny" in text and "## RL: before / after" in text
  assert "| SFT (before) | 0.5 | 0.4 | - | - | 0 |" in text
  assert "| grpo | 0.55 | 0.45 | - | - | 0.2 |" in text
  assert_png(tmp_path / "sft_before_after.png")
  assert_png(tmp_path / "grpo_reward.png")
  assert os.path.getsize(page) > os.path.getsize(md)
  assert rl_table({"x": [{"step": 3, "train/loss": 1.0}]}) == []


def test_countdown_lines():
  now = [100.0]
  countdown = Countdown(4, clock=lambda: now[0])
  assert countdown.line(1, "stage", "pretrain") == "stage 1 of 4 (pretrain) | elapsed 0s"
  now[0] += 120
  assert countdown.line(3, "run") == "run 3 of 4 | elapsed 2m00s | remaining ~2m00s"
  assert countdown.eta(2) == "ETA 2m00s" and format_duration(3725) == "1h02m"
  with pytest.raises(ValueError):
    plots.sweep_grid([], ["a", "b", "c"], "m")

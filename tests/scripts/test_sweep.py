"""Sweep: the grid expands to the exact train commands; summaries rank runs by the metric."""

import json
import sys

from scripts.sweep import parse_grid, summarise, sweep_commands


def test_grid_expands_to_train_commands():
  runs = sweep_commands("configs/pretrain.py:tiny", "runs/s",
                        ["optimizer.lr=1e-3,3e-3", "model.num_layers=2"],
                        ["--config.train.steps=5"])
  assert [r for r, _ in runs] == ["runs/s/lr=1e-3,num_layers=2", "runs/s/lr=3e-3,num_layers=2"]
  assert runs[1][1] == [sys.executable, "-m", "scripts.train",
                        "--config=configs/pretrain.py:tiny",
                        "--workdir=runs/s/lr=3e-3,num_layers=2",
                        "--config.optimizer.lr=3e-3", "--config.model.num_layers=2",
                        "--config.train.steps=5"]
  assert parse_grid(["config.a.b=1"]) == [("a.b", ["1"])]


def test_summary_ranks_by_metric(tmp_path):
  runs = []
  for name, losses in (("a", [3.0, 2.0]), ("b", [1.5]), ("c", None)):
    run_dir = tmp_path / name
    run_dir.mkdir()
    if losses:
      (run_dir / "metrics.jsonl").write_text("".join(
          json.dumps({"step": i + 1, "eval/loss": v}) + "\n" for i, v in enumerate(losses)))
    runs.append((str(run_dir), []))
  rows = summarise(runs, "eval/loss")
  assert [(r["run"], r.get("eval/loss")) for r in rows] == [("b", 1.5), ("a", 2.0), ("c", None)]

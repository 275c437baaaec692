"""Grid sweeps over config fields: one training run per combination, then a summary table.

  python -m scripts.sweep --config configs/pretrain.py:tiny --workdir runs/lr_sweep \\
      --grid optimizer.lr=1e-3,3e-3,1e-2 --grid model.num_layers=2,4 -- --config.train.steps=300

Each run is `python -m scripts.train` in its own process and workdir
(`runs/lr_sweep/lr=0.001,num_layers=2`), so one failing run does not stop the others and
rerunning the sweep resumes unfinished runs and skips finished ones. Arguments after `--` go to
every run. `--dry_run` only prints the commands (e.g. to hand them to a cluster scheduler).
The summary (last logged metrics of every run, best `--metric` first) is printed and written
to `{workdir}/sweep.jsonl`, and `{workdir}/report.html` shows the ranked runs and `--metric`
against the swept fields (a line for one field, a heatmap for two).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys

from absl import app, flags

from configs.cli import parse_flags
from training.eta import Countdown
from training.metrics import read_metrics
from training.reports import sweep_report



def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
  """['a.b=1,2', 'c=x'] -> [('a.b', ['1', '2']), ('c', ['x'])]."""
  axes = []
  for item in grid:
    field, sep, values = item.partition("=")
    if not sep or not field or not values:
      raise app.UsageError(f"--grid {item!r}: expected field=value1,value2,...")
    axes.append((field.removeprefix("config."), values.split(",")))
  return axes


def run_name(assignment: list[tuple[str, str]]) -> str:
  return ",".join(f"{field.split('.')[-1]}={value}" for field, value in assignment) or "base"


def sweep_commands(config: str, workdir: str, grid: list[str], extra: list[str]
                   ) -> list[tuple[str, list[str]]]:
  """(run workdir, argv) for every combination of the grid."""
  axes = parse_grid(grid)
  runs = []
  for values in itertools.product(*[v for _, v in axes]):
    assignment = list(zip([f for f, _ in axes], values))
    run_dir = os.path.join(workdir, run_name(assignment))
    argv = [sys.executable, "-m", "scripts.train", f"--config={config}", f"--workdir={run_dir}"]
    argv += [f"--config.{field}={value}" for field, value in assignment] + list(extra)
    runs.append((run_dir, argv))
  return runs


def summarise(runs: list[tuple[str, list[str]]], metric: str) -> list[dict]:
  """Last logged value of every metric per run, best `metric` first (missing: last)."""
  rows = []
  for run_dir, _ in runs:
    last: dict = {"run": os.path.basename(run_dir)}
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
      for record in read_metrics(run_dir):
        last.update(record)
    rows.append(last)
  return sorted(rows, key=lambda r: (metric not in r, r.get(metric, 0.0)))


def write_report(workdir: str, grid: list[str], rows: list[dict], metric: str) -> str:
  """`{workdir}/report.html` (and .md): the ranked runs and `metric` against the swept
  fields (training/reports.py); returns the HTML path."""
  axes = parse_grid(grid)
  fields = [field for field, _ in axes]
  values = {}
  for assignment in itertools.product(*[[(f, v) for v in vs] for f, vs in axes]):
    values[run_name(list(assignment))] = dict(assignment)
  rows = [{**values.get(row["run"], {}), **row} for row in rows]
  return sweep_report(workdir, rows, fields, metric)[1]


def main(argv):
  runs = sweep_commands(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.grid, argv[1:])
  if flags.FLAGS.dry_run:
    for _, command in runs:
      print(shlex.join(command))
    return
  failed = []
  countdown = Countdown(len(runs))
  for k, (run_dir, command) in enumerate(runs, start=1):
    print(f"== {countdown.line(k, 'run', os.path.basename(run_dir))}", flush=True)
    if subprocess.run(command, check=False).returncode:
      failed.append(os.path.basename(run_dir))
  rows = summarise(runs, flags.FLAGS.metric)
  with open(os.path.join(flags.FLAGS.workdir, "sweep.jsonl"), "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  for row in rows:
    value = row.get(flags.FLAGS.metric)
    shown = f"{value:.4f}" if isinstance(value, float) else "-"
    print(f"{row['run']:40s} {flags.FLAGS.metric} {shown}  step {row.get('step', '-')}")
  report = write_report(flags.FLAGS.workdir, flags.FLAGS.grid, rows, flags.FLAGS.metric)
  print(f"report: {report}")
  if failed:
    sys.exit(f"failed runs: {', '.join(failed)}")


def define_flags():
  """Defined on use, not import: other entry points define flags of the same names."""
  flags.DEFINE_string("config", None, "Stage config file[:preset], as for scripts.train.")
  flags.DEFINE_string("workdir", None, "Parent directory of the sweep's runs.")
  flags.DEFINE_multi_string("grid", [], "field=v1,v2,...: values of one config field.")
  flags.DEFINE_string("metric", "eval/loss", "Summary metric (lower is better).")
  flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

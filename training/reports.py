"""The reports the entry points write: runs' curves (scripts/report.py), the pipeline's
report (scripts/pipeline.py, `{workdir}/report.html`) and a sweep's (scripts/sweep.py).

Everything is read back from the runs' metrics.jsonl (training/metrics.py `read_metrics`),
so a report can be rebuilt at any time from the workdirs alone, and drawn by training/
plots.py, whose figures carry exactly the values read.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from training import plots
from training.metrics import read_metrics
from training.report_doc import ReportDoc

TASK_RESULTS = "task_eval.json"   # training/task_eval.py writes it into the run's workdir

# The RL before / after table: the SFT policy (each RL run's step-0 evaluation) and each
# RL stage's last evaluation.
RL_COLUMNS = (("held-out greedy reward", "eval/reward"),
              ("held-out sampled reward", "eval/sampled_reward"),
              ("RL prompts, sampled reward", "eval_train/sampled_reward"),
              ("held-out answer accuracy", "eval/answer_accuracy"),
              ("held-out KL to SFT", "eval/kl"))


def read_runs(run_dirs: Sequence[str]) -> dict[str, list[dict]]:
  """{label: records} of the runs that have a metrics.jsonl; labels are the shortest
  distinct path tails (`sft`, or `a/sft` and `b/sft`)."""
  dirs = [os.path.normpath(d) for d in run_dirs if os.path.exists(
      os.path.join(d, "metrics.jsonl"))]
  depth = 1
  while depth < 8:
    labels = [os.path.join(*d.split(os.sep)[-depth:]) for d in dirs]
    if len(set(labels)) == len(labels):
      break
    depth += 1
  return {label: read_metrics(d) for label, d in zip(labels, dirs)}


def last_values(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Every tag's last logged value."""
  last: dict[str, float] = {}
  for record in records:
    last.update(record)
  return last


def before_after(records: Sequence[Mapping[str, float]], tags: Sequence[str]
                 ) -> list[tuple[str, float, float]]:
  """(tag, first, last) of each held-out tag logged at two steps or more."""
  rows = []
  for tag in tags:
    steps, values = plots.curve_series(records, tag)
    if tag.startswith("eval") and steps.size >= 2:
      rows.append((tag, float(values[0]), float(values[-1])))
  return rows


def add_curves(doc: ReportDoc, runs: Mapping[str, Sequence[Mapping]], stem: str) -> int:
  """One figure per panel the runs logged (all runs overlaid); returns how many."""
  panels = plots.curve_panels(runs)
  for title, tags in panels:
    name = title.split(" (")[0].replace(" ", "_")
    doc.figure(plots.plot_curves(runs, tags, title), f"{stem}_{name}", title)
  return len(panels)


def run_report(run_dirs: Sequence[str], out_dir: str) -> tuple[str, str]:
  """Curves of every run (overlaid when several), their last values and before / after
  figures; returns the paths of report.md and report.html."""
  runs = read_runs(run_dirs)
  if not runs:
    raise FileNotFoundError(f"no metrics.jsonl in any of {list(run_dirs)}")
  doc = ReportDoc("Runs: " + ", ".join(runs), out_dir)
  doc.heading("Curves")
  add_curves(doc, runs, "runs")
  doc.heading("Last values")
  tags = sorted({t for records in runs.values() for t in last_values(records) if t != "step"})
  lasts = {label: last_values(records) for label, records in runs.items()}
  doc.table(["metric", *runs], [[t, *(lasts[r].get(t) for r in runs)] for t in tags])
  for label, records in runs.items():
    rows = before_after(records, tags)
    if rows:
      doc.heading(f"{label}: before / after", 3)
      doc.table(["metric", "first", "last"], rows)
  for run_dir in run_dirs:
    add_task_results(doc, run_dir, os.path.basename(os.path.normpath(run_dir)))
  return doc.write()


def add_task_results(doc: ReportDoc, run_dir: str, label: str) -> bool:
  """The run's task evaluation (`{run_dir}/task_eval.json`, scripts/evaluate.py --tasks) as
  a table, if it has one."""
  path = os.path.join(run_dir, TASK_RESULTS)
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  doc.heading(f"{label}: task evaluation", 3)
  doc.table(["task", "type", "metric", "value"],
            [[*key.removeprefix("tasks/").split("/", 2), value]
             for key, value in sorted(results.items())])
  return True


def rl_table(runs: Mapping[str, Sequence[Mapping]]) -> list[list]:
  """Rows of the RL before / after table: 'SFT (before)' (the first RL run's step-0
  evaluation), then each RL run's last evaluation; columns `RL_COLUMNS`."""
  rows = []
  for label, records in runs.items():
    evaluated = [r for r in records if "eval/reward" in r]
    if not evaluated:
      continue
    if not rows and evaluated[0]["step"] == 0:
      rows.append(["SFT (before)", *(evaluated[0].get(t) for _, t in RL_COLUMNS)])
    after = last_values(evaluated)
    rows.append([label, *(after.get(t) for _, t in RL_COLUMNS)])
  return rows


def pipeline_report(workdir: str, stages: Sequence[tuple[str, str]],
                    summary: Mapping[str, Mapping[str, float]]) -> tuple[str, str]:
  """`{workdir}/report.{md,html}`: per stage its curves, before / after figure and the
  command that reproduces it; the RL before / after table; the summary of every stage.

  Args:
    workdir: the pipeline's workdir (stage runs in `{workdir}/{stage}`).
    stages: (stage, command) in pipeline order.
    summary: the pipeline's summary ({stage: {headline metric: value}}).
  """
  doc = ReportDoc("Pipeline report", workdir)
  doc.text(f"Every stage of {workdir}, read back from its metrics.jsonl. Rerunning a command "
           "resumes (or skips) that stage.")
  rl_runs = {}
  for name, command in stages:
    run_dir = os.path.join(workdir, name)
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
      continue
    records = read_metrics(run_dir)
    doc.heading(name)
    doc.code(command)
    figures = summary.get(name, {})
    if figures:
      doc.table(["held-out metric", "value"], sorted(figures.items()))
    add_curves(doc, {name: records}, name)
    add_task_results(doc, run_dir, name)
    rows = before_after(records, sorted(last_values(records)))
    if rows:
      doc.figure(plots.plot_before_after(rows, "value"), f"{name}_before_after",
                 "held-out figures: first evaluation (before) and last (after)")
    if any("eval/reward" in r for r in records):
      rl_runs[name] = records
  table = rl_table(rl_runs)
  if table:
    doc.heading("RL: before / after")
    doc.table(["policy", *(c for c, _ in RL_COLUMNS)], table)
  return doc.write()


def sweep_report(workdir: str, rows: Sequence[Mapping], fields: Sequence[str], metric: str
                 ) -> tuple[str, str]:
  """`{workdir}/report.{md,html}` of a sweep: the runs ranked by `metric` (rows in rank
  order, each holding its swept fields' values) and, for one or two swept fields, `metric`
  against them (a line, or a heatmap)."""
  doc = ReportDoc(f"Sweep: {metric}", workdir)
  doc.heading("Ranked runs (best first)")
  doc.table(["rank", "run", *fields, metric, "step"],
            [[i + 1, r["run"], *(r.get(f) for f in fields), r.get(metric), r.get("step")]
             for i, r in enumerate(rows)])
  if fields and len(fields) <= 2:
    doc.figure(plots.plot_sweep(rows, fields, metric), "sweep",
               f"{metric} against {' and '.join(fields)}")
  return doc.write()

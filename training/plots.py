"""Figures of runs, drawn from their metrics.jsonl records (matplotlib, Agg backend, PNG).

Every plot is fed by a pure extraction function, so what a figure shows can be checked
against the metrics file without reading pixels:

    curve_series(records, tag)        -> (steps, values) of one tag, in step order
    curve_panels(runs)                -> the panels a run report draws (loss, headline
                                         metrics, lr, grad norm, tokens/s) and their tags
    plot_curves(runs, tags, title)    one panel, one line per (run, tag)
    plot_sweep(values, metric)        a swept field against a metric (one field: line;
                                      two fields: heatmap)
    plot_before_after(rows)           grouped bars of a table's before / after figures

Each `plot_*` returns the matplotlib Figure, whose line data (`ax.lines[i].get_xydata()`)
or image array are exactly the extracted values; `save_png` writes and closes it.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training host

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

Records = Sequence[Mapping[str, float]]

# The panels of a run report: title -> tags, each drawn where a run logged it. Headline
# metrics are the held-out figures each stage exists for (scripts/pipeline.py HEADLINES).
PANELS = (
    ("loss", ("train/loss", "eval/loss", "eval_replay/loss")),
    ("held-out accuracy", ("eval/accuracy", "eval/answer_accuracy", "eval/pairs/accuracy",
                           "eval/rewards/accuracies", "eval/masked_accuracy",
                           "eval/token_accuracy", "train/accuracy")),
    ("reward", ("train/score", "eval/reward", "eval/sampled_reward", "eval_train/reward",
                "eval_train/sampled_reward")),
    ("KL to the reference", ("train/kl", "eval/kl", "eval/sampled_kl")),
    ("learning rate", ("train/lr",)),
    ("gradient norm", ("train/grad_norm",)),
    ("throughput (tokens/s)", ("perf/tokens_per_sec",)),
    ("seconds per RL iteration", ("perf/iteration_s",)),
)


def curve_series(records: Records, tag: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) float64 arrays of the records that hold a finite `tag`, in step order."""
  points = sorted((float(r["step"]), float(r[tag])) for r in records
                  if tag in r and isinstance(r[tag], (int, float)) and math.isfinite(r[tag]))
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps), np.asarray(values)


def curve_panels(runs: Mapping[str, Records]) -> list[tuple[str, list[str]]]:
  """The `PANELS` (title, tags) that at least one of `runs` logged, with only those tags."""
  panels = []
  for title, tags in PANELS:
    present = [t for t in tags if any(curve_series(r, t)[0].size for r in runs.values())]
    if present:
      panels.append((title, present))
  return panels


def plot_curves(runs: Mapping[str, Records], tags: Sequence[str], title: str):
  """One axes: a line per (run, tag) that has points, labelled `run: tag` (just the tag
  for one run). Line order: runs in the given order, tags in the given order."""
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for label, records in runs.items():
    for tag in tags:
      steps, values = curve_series(records, tag)
      if steps.size:
        name = tag if len(runs) == 1 else f"{label}: {tag}"
        ax.plot(steps, values, marker="o" if steps.size < 3 else None, markersize=3,
                label=name)
  ax.set_title(title)
  ax.set_xlabel("step")
  if title == "learning rate" or "throughput" in title:
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def sweep_grid(rows: Sequence[Mapping], fields: Sequence[str], metric: str
               ) -> tuple[list[list[str]], np.ndarray]:
  """The swept values per field (in first-seen order) and the metric on that grid.

  Args:
    rows: one mapping per run holding each of `fields` (its value, as swept) and, when the
      run logged it, `metric`.
    fields: one or two swept fields.
    metric: the ranked metric.

  Returns:
    (axes, grid): `axes[i]` the distinct values of `fields[i]`; `grid` float64 of shape
    `[len(axes[0])]` or `[len(axes[0]), len(axes[1])]`, NaN where a run has no `metric`.
  """
  if len(fields) not in (1, 2):
    raise ValueError(f"a sweep plot shows one or two fields, got {list(fields)}")
  axes = [list(dict.fromkeys(str(r[f]) for r in rows)) for f in fields]
  grid = np.full([len(a) for a in axes], np.nan)
  for row in rows:
    if isinstance(row.get(metric), (int, float)):
      index = tuple(a.index(str(row[f])) for a, f in zip(axes, fields))
      grid[index] = float(row[metric])
  return axes, grid


def _numeric(values: Sequence[str]) -> np.ndarray | None:
  try:
    return np.asarray([float(v) for v in values])
  except ValueError:
    return None


def plot_sweep(rows: Sequence[Mapping], fields: Sequence[str], metric: str):
  """A swept field against `metric` (a line; log x when the values span a decade or more),
  or two fields as a heatmap of `metric` with each cell's value written in it."""
  axes, grid = sweep_grid(rows, fields, metric)
  if len(fields) == 1:
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    x = _numeric(axes[0])
    if x is None:
      ax.plot(np.arange(len(axes[0])), grid, marker="o")
      ax.set_xticks(np.arange(len(axes[0])), axes[0])
    else:
      order = np.argsort(x)
      ax.plot(x[order], grid[order], marker="o")
      if x.min() > 0 and x.max() / x.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(fields[0])
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  else:
    fig, ax = plt.subplots(figsize=(1.2 * len(axes[1]) + 3, 0.6 * len(axes[0]) + 2.4))
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(np.arange(len(axes[1])), axes[1])
    ax.set_yticks(np.arange(len(axes[0])), axes[0])
    ax.set_xlabel(fields[1])
    ax.set_ylabel(fields[0])
    for (i, j), value in np.ndenumerate(grid):
      if np.isfinite(value):
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8, color="w")
    fig.colorbar(image, ax=ax, label=metric)
  ax.set_title(f"{metric} (sweep)")
  fig.tight_layout()
  return fig


def plot_before_after(rows: Sequence[tuple[str, float, float]], ylabel: str):
  """Grouped bars: for each (name, before, after), a 'before' and an 'after' bar."""
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 3.4))
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r[1] for r in rows], width=0.4, label="before")
  ax.bar(x + 0.2, [r[2] for r in rows], width=0.4, label="after")
  ax.set_xticks(x, [r[0] for r in rows], fontsize=8)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return fig


def plot_xy(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
            ylabel: str, title: str, fitted: Mapping[str, tuple[Sequence[float],
                                                                 Sequence[float]]] = (),
            logx: bool = False, logy: bool = False, colors: Mapping[str, str] = ()):
  """Measured points (markers) per named series, and fitted curves (lines) per name;
  `colors` fixes the colour of the series and curves it names (e.g. a method's points and
  its frontier alike)."""
  colors = dict(colors)
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for name, (x, y) in series.items():
    ax.plot(x, y, marker="o", linestyle="none", label=name, color=colors.get(name))
  for name, (x, y) in dict(fitted).items():
    ax.plot(x, y, linestyle="--", label=name, color=colors.get(name))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if logx:
    ax.set_xscale("log")
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def save_png(fig, path: str) -> str:
  """Writes `fig` as a PNG at `path` (folders made) and closes it; returns `path`."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, format="png", dpi=90)
  plt.close(fig)
  return path

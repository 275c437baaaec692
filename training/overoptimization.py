"""Reward-model over-optimisation (Gao, Schulman & Hilton, 2023) on the tiny world: best-of-N
and RL against the learned reward model (the proxy), with the verifiable gold reward measured
alongside (configs/papers/overoptimization.py states the claim).

    d = sqrt(KL(pi || pi_SFT)); R = gold reward minus the SFT policy's (R(0) = 0)
    best-of-N   R(d) = d (alpha - beta d)         peak d* = alpha / (2 beta)
    RL          R(d) = d (alpha - beta log d)     peak d* = exp(alpha / beta - 1)

Both forms are linear in (alpha, beta), so each fit is one linear least-squares solve over
the measured points (d log d -> 0 at d = 0); with beta <= 0 the fitted gold never turns
down and has no peak. The proxy gets the same fits, for the figure.

`train_runs` trains (the base chain, one GRPO run against the proxy) and draws the SFT
policy's best-of-N pool (`{workdir}/evals/bon_pool.json`); `analyse` reads only files.
"""

from __future__ import annotations

import dataclasses
import math
import os

import ml_collections
import numpy as np

from configs.papers.overoptimization import PAPER
from training import plots
from training.report_doc import ReportDoc
from training.rlhf_runs import (Judge, base_dirs, best_of_n, bon_kl, eval_points, read_json,
                                rl_config, train_base, write_json)
from training.run import run_stage

FORMS = ("bon", "rl")


@dataclasses.dataclass(frozen=True)
class Point:
  """One policy: how it was made, d = sqrt(KL to SFT), and its proxy and gold rewards."""
  method: str   # 'bon' | 'rl'
  label: str
  d: float
  proxy: float
  gold: float


@dataclasses.dataclass(frozen=True)
class Fit:
  """R(d) = d (alpha - beta d) (form 'bon') or d (alpha - beta log d) (form 'rl')."""
  form: str
  alpha: float
  beta: float
  rmse: float

  def __call__(self, d):
    d = np.asarray(d, np.float64)
    if self.form == "bon":
      return d * (self.alpha - self.beta * d)
    return d * (self.alpha - self.beta * np.log(np.maximum(d, 1e-12)))

  @property
  def peak_d(self) -> float:
    """The d >= 0 maximising R(d): the paper's d* when beta > 0 (for best-of-N 0 when
    alpha <= 0: R falls from the start); inf when R grows without bound (beta < 0, or
    beta = 0 < alpha); 0 when R never rises (beta = 0, alpha <= 0)."""
    if self.beta == 0:
      return math.inf if self.alpha > 0 else 0.0
    if self.beta < 0:
      return math.inf
    if self.form == "bon":
      return max(0.0, self.alpha / (2 * self.beta))
    return math.exp(self.alpha / self.beta - 1)


def fit_form(d: np.ndarray, gain: np.ndarray, form: str) -> Fit:
  """Least-squares (alpha, beta) of `form` (module docstring) through (d, gain).

  Raises:
    ValueError: an unknown form, or fewer than two points with d > 0.
  """
  if form not in FORMS:
    raise ValueError(f"unknown form {form!r}: {FORMS}")
  d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
  if int(np.sum(d > 0)) < 2:
    raise ValueError(f"the {form} fit needs at least two points with d > 0, got "
                     f"{int(np.sum(d > 0))}")
  curve = d * d if form == "bon" else d * np.log(np.where(d > 0, d, 1.0))
  design = np.stack([d, -curve], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
  fit = Fit(form, float(alpha), float(beta), 0.0)
  rmse = float(np.sqrt(np.mean((fit(d) - gain) ** 2)))
  return dataclasses.replace(fit, rmse=rmse)


def rl_run_config(config: ml_collections.ConfigDict, workdir: str
                  ) -> tuple[str, ml_collections.ConfigDict]:
  """(run dir, config) of the GRPO run against the proxy alone (no KL, no stop penalty)."""
  dirs = base_dirs(config, workdir)
  run = rl_config(config, dirs, "grpo")
  run.reward.update(dict(function="", model=dirs["reward"], missing_stop_penalty=0.0))
  run.objective.kl_coef = 0.0
  run.optimizer.lr = config.rl_lr
  run.train.update(dict(steps=config.rl_steps, eval_every=config.rl_eval_every))
  run.checkpoint.every_steps = config.rl_steps
  return os.path.join(workdir, "runs", "grpo_proxy"), run


def train_runs(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the base chain and the RL run (resuming), and draws the best-of-N pool once."""
  dirs = train_base(config, workdir)
  run_dir, run = rl_run_config(config, workdir)
  print(f"== RL against the proxy: {os.path.basename(run_dir)}", flush=True)
  run_stage(run, run_dir)
  pool_path = os.path.join(workdir, "evals", "bon_pool.json")
  if not os.path.exists(pool_path):
    write_json(pool_path, Judge(config, dirs, workdir).pool(dirs["sft"], max(config.bon_ns)))


def collect_points(config: ml_collections.ConfigDict, workdir: str) -> list[Point]:
  """Best-of-N points from the pool, then the RL run's evaluations (step 0: SFT)."""
  pool = read_json(os.path.join(workdir, "evals", "bon_pool.json"))
  proxy, gold = np.asarray(pool["proxy"]), np.asarray(pool["gold"])
  points = []
  for n in config.bon_ns:
    p, g = best_of_n(proxy, gold, n)
    points.append(Point("bon", f"N={n}", math.sqrt(bon_kl(n)), p, g))
  run_dir, _ = rl_run_config(config, workdir)
  for p in eval_points(run_dir):
    points.append(Point("rl", f"iteration {p['step']:g}", math.sqrt(max(p["kl"], 0.0)),
                        p["proxy"], p["gold"]))
  return points


def fit_points(points: list[Point]) -> dict[str, dict[str, Fit]]:
  """{method: {'gold': Fit, 'proxy': Fit}} of the gains over each method's first point (the
  SFT policy: N = 1, iteration 0)."""
  fits = {}
  for method in FORMS:
    mine = [p for p in points if p.method == method]
    d = np.asarray([p.d for p in mine])
    fits[method] = {key: fit_form(d, np.asarray([getattr(p, key) for p in mine])
                                  - getattr(mine[0], key), method)
                    for key in ("gold", "proxy")}
  return fits


def _describe(name: str, fit: Fit, points: list[Point], start: Point) -> str:
  """One sentence: the gold fit's peak against the measured range and the measured best."""
  top = max(p.d for p in points)
  best = max(points, key=lambda p: p.gold)
  measured = (f"measured gold: {start.gold:.3f} at the start, best {best.gold:.3f} at d "
              f"{best.d:.2f} ({best.label}), last {points[-1].gold:.3f} at d {points[-1].d:.2f}")
  if fit.peak_d == 0:
    shape = (f"the fitted gold falls from the start (alpha {fit.alpha:.3g} <= 0): its best "
             "policy is the SFT one, over-optimised from the first step")
  elif math.isinf(fit.peak_d) and fit(top) < 0:
    shape = (f"the fitted gold falls over the whole measured range (alpha {fit.alpha:.3g} < "
             f"0) and turns up only far beyond it (beta {fit.beta:.3g} < 0): over-optimised "
             "from the first step, with no early rise")
  elif math.isinf(fit.peak_d):
    shape = "the fitted gold never turns down (beta <= 0): no over-optimisation seen"
  elif fit.peak_d <= top:
    shape = (f"the fitted gold peaks at d* {fit.peak_d:.2f} (KL {fit.peak_d ** 2:.2f} nats), "
             f"inside the measured range (d up to {top:.2f}): over-optimisation, as the paper")
  else:
    shape = (f"the fitted gold peaks at d* {fit.peak_d:.2f} (KL {fit.peak_d ** 2:.2f} nats), "
             f"beyond the measured d up to {top:.2f}: gold still rising where measured")
  return f"{name}: {shape}; {measured}."


def analyse(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, str]:
  """Fits the points and writes `{workdir}/report.{md,html}`; returns (fits, HTML path)."""
  points = collect_points(config, workdir)
  fits = fit_points(points)
  # The held-out questions actually there (the tiny world holds out 37 distinct ones).
  questions = len(read_json(os.path.join(workdir, "evals", "bon_pool.json"))["gold"])
  doc = ReportDoc("Reward-model over-optimisation on the tiny world", workdir)
  doc.text(f"{PAPER['figure']}: {PAPER['claim']}. Here the proxy is the tiny world's "
           "Bradley-Terry reward model and the gold reward its answer check (share of "
           f"{config.eval.samples} sampled replies to each of {questions} held-"
           f"out questions stating the answer); best-of-N at N {list(config.bon_ns)} over the "
           "SFT policy (KL log N - (N - 1) / N), and GRPO against the proxy alone "
           f"({config.rl_steps} iterations, evaluated every {config.rl_eval_every}; KL: the "
           "exact per-token KL to the SFT policy summed along the sampled replies).")
  grid = {m: np.linspace(0, max(p.d for p in points if p.method == m), 60) for m in FORMS}
  names = {"bon": "best-of-N", "rl": "RL (GRPO)"}
  for key in ("gold", "proxy"):
    series, lines, colors = {}, {}, {}
    for k, m in enumerate(FORMS):
      colors[f"{names[m]} {key}"] = colors[f"{names[m]} fit"] = f"C{k}"
      mine = [p for p in points if p.method == m]
      series[f"{names[m]} {key}"] = ([p.d for p in mine],
                                     [getattr(p, key) - getattr(mine[0], key) for p in mine])
      lines[f"{names[m]} fit"] = (grid[m], fits[m][key](grid[m]))
    doc.figure(plots.plot_xy(series, xlabel="d = sqrt(KL to SFT)",
                             ylabel=f"{key} reward gain over SFT",
                             title=f"{key} reward against d: points and the paper's forms",
                             fitted=lines, colors=colors),
               f"overoptimization_{key}", f"{key} reward gain against sqrt(KL)")
  doc.heading("Fitted coefficients")
  doc.table(["method", "reward", "form", "alpha", "beta", "rmse", "peak d*", "peak KL"],
            [[names[m], key, "d (alpha - beta d)" if m == "bon" else "d (alpha - beta log d)",
              f.alpha, f.beta, f.rmse, f.peak_d, f.peak_d ** 2]
             for m in FORMS for key, f in fits[m].items()])
  for m in FORMS:
    mine = [p for p in points if p.method == m]
    doc.text(_describe(names[m], fits[m]["gold"], mine, mine[0]))
    proxy_gain = mine[-1].proxy - mine[0].proxy
    doc.text(f"{names[m]} proxy: {mine[0].proxy:.3f} -> {mine[-1].proxy:.3f} "
             f"({'rising' if proxy_gain > 0 else 'not rising'} with d, "
             f"{'as the paper' if proxy_gain > 0 else 'unlike the paper'}).")
  doc.heading("Every policy")
  doc.table(["method", "policy", "d", "KL", "proxy", "gold"],
            [[names[p.method], p.label, p.d, p.d ** 2, p.proxy, p.gold] for p in points])
  return fits, doc.write()[1]

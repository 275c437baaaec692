"""Chinchilla approach 3 (Hoffmann et al., 2022) on the tiny corpus: a grid of real
pretraining runs (training/run.py `run_stage`, the entry of scripts.train), a parametric fit
of their final losses, and a report (configs/papers/chinchilla.py states the claim).

    L(N, D) = E + A / N^alpha + B / D^beta
    fitted as the paper does: log L = LSE(a - alpha log N, b - beta log D, e), A = e^a,
    B = e^b, E = e^e, minimising the Huber loss (delta 1e-3) of the log-loss residuals with
    L-BFGS from the best starts of an (alpha, beta) grid
    compute-optimal size for C = 6 N D:  N_opt(C) = G (C / 6)^(beta / (alpha + beta)),
                                         G = (alpha A / (beta B))^(1 / (alpha + beta))

Runs already finished in the workdir are not trained again (rerunning resumes), so the fit
and report can be redone from the runs alone: `analyse(workdir, config)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import os

import ml_collections
import numpy as np
from scipy import optimize, special

from configs.papers.chinchilla import PAPER
from configs.run_layout import has_run_config
from models.build import build_model_spec, count_params
from training import plots
from training.eta import Countdown
from training.metrics import read_metrics
from training.report_doc import ReportDoc
from training.run import run_stage


@dataclasses.dataclass(frozen=True)
class Point:
  """One run: non-embedding parameters, tokens trained on, final held-out loss."""
  name: str
  params: float
  tokens: float
  loss: float


@dataclasses.dataclass(frozen=True)
class Fit:
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float

  def loss(self, n, d):
    return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

  @property
  def a(self) -> float:
    """The exponent of N_opt ~ C^a."""
    return self.beta / (self.alpha + self.beta)

  def optimal_params(self, compute: float) -> float:
    """N minimising L(N, C / (6 N)) for C = `compute` FLOPs."""
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    return g * (compute / 6) ** self.a


def run_configs(config: ml_collections.ConfigDict, workdir: str
                ) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(run workdir, pretraining config) of every (size, steps) pair, smallest first; every run
  after the first uses the first run's tokenizer."""
  path, _, preset = config.base.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  runs = []
  for (d_model, layers), steps in itertools.product(config.sizes, config.steps):
    run = module.get_config(preset)
    run.model.update(dict(d_model=d_model, num_layers=layers, num_heads=max(1, d_model // 16),
                          num_kv_heads=max(1, d_model // 16), mlp_dim=3 * d_model))
    run.data.update(dict(global_batch_size=config.global_batch_size, seq_len=config.seq_len,
                         tiny_world_train_docs=config.train_docs,
                         tiny_world_eval_docs=max(40, config.train_docs // 20)))
    run.train.update(dict(steps=steps, eval_every=steps, eval_steps=config.eval_steps,
                          log_every=max(1, steps // 4)))
    run.optimizer.update(dict(lr=config.lr, warmup_steps=max(1, steps // 10)))
    run.checkpoint.every_steps = steps
    name = f"d{d_model}_l{layers}_s{steps}"
    runs.append((os.path.join(workdir, "runs", name), run))
  first = os.path.join(runs[0][0], "tokenizer", "spm.model")
  for _, run in runs[1:]:
    run.data.tokenizer = first
  return runs


def train_runs(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains every run of the grid (finished ones cost only a resume check)."""
  runs = run_configs(config, workdir)
  countdown = Countdown(len(runs))
  for k, (run_dir, run) in enumerate(runs, start=1):
    print(f"== {countdown.line(k, 'run', os.path.basename(run_dir))}", flush=True)
    run_stage(run, run_dir)


def collect_points(config: ml_collections.ConfigDict, workdir: str) -> list[Point]:
  """Every finished run's (N, D, final eval loss), read back from its metrics.jsonl."""
  points = []
  for run_dir, run in run_configs(config, workdir):
    if not has_run_config(run_dir):
      continue
    losses = [r["eval/loss"] for r in read_metrics(run_dir)
              if "eval/loss" in r and r["step"] == run.train.steps]
    if not losses:
      continue
    spec = build_model_spec(run.model)
    params = count_params(spec.shapes, exclude_embedding=True)
    tokens = run.train.steps * run.data.global_batch_size * run.data.seq_len
    points.append(Point(os.path.basename(run_dir), float(params), float(tokens), losses[-1]))
  return points


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
  small = np.abs(residual) <= delta
  return np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta))


def fit_scaling_law(points: list[Point], delta: float = 1e-3) -> Fit:
  """Approach 3's fit of `points` (see the module docstring); the best of a grid of starts.

  Raises:
    ValueError: fewer than 5 points (the law has 5 parameters).
  """
  if len(points) < 5:
    raise ValueError(f"the fit needs at least 5 runs, got {len(points)}")
  log_n = np.log([p.params for p in points])
  log_d = np.log([p.tokens for p in points])
  log_l = np.log([p.loss for p in points])

  def objective(x):
    """The Huber loss of the log residuals and its gradient (analytic: L-BFGS then needs
    one evaluation per step instead of six)."""
    a, b, e, alpha, beta = x
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    pred = special.logsumexp(terms, axis=0)
    weights = np.exp(terms - pred)            # d pred / d (a, b, e)
    slope = np.clip(pred - log_l, -delta, delta)  # d huber / d residual
    grad = np.array([slope @ weights[0], slope @ weights[1], slope @ weights[2],
                     -slope @ (weights[0] * log_n), -slope @ (weights[1] * log_d)])
    return float(np.sum(_huber(pred - log_l, delta))), grad

  # Starts: a grid over (alpha, beta), E, A, B then linear in L and solved by non-negative
  # least squares; the best few start L-BFGS (the paper starts it from a grid of all five).
  losses = np.exp(log_l)
  starts = []
  for alpha, beta in itertools.product(np.linspace(0.05, 2.0, 40), repeat=2):
    design = np.stack([np.exp(-alpha * log_n), np.exp(-beta * log_d), np.ones_like(log_n)], 1)
    coef = np.maximum(optimize.nnls(design, losses)[0], 1e-8)
    x = np.array([math.log(coef[0]), math.log(coef[1]), math.log(coef[2]), alpha, beta])
    starts.append((objective(x)[0], tuple(x)))
  best = None
  for _, start in sorted(starts)[:4]:
    result = optimize.minimize(objective, np.asarray(start), method="L-BFGS-B", jac=True)
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  return Fit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
             beta=float(beta), objective=float(best.fun))


def analyse(config: ml_collections.ConfigDict, workdir: str) -> tuple[Fit, str]:
  """Fits the finished runs and writes `{workdir}/report.{md,html}`; returns the fit and the
  HTML path."""
  points = collect_points(config, workdir)
  fit = fit_scaling_law(points, config.huber_delta)
  doc = ReportDoc("Chinchilla approach 3 on the tiny corpus", workdir)
  doc.text("Hoffmann et al. (2022), sec. 3.3: the final loss of N parameters trained on D "
           "tokens follows L(N, D) = E + A / N^alpha + B / D^beta; their fit gives alpha "
           f"{PAPER['alpha']}, beta {PAPER['beta']}, so N_opt ~ C^{PAPER['a']}. Here: "
           f"{len(points)} pretraining runs of the tiny world.")
  sizes = sorted({p.params for p in points})
  series, fitted, colors = {}, {}, {}
  grid = np.geomspace(min(p.tokens for p in points), max(p.tokens for p in points), 50)
  for i, n in enumerate(sizes):
    mine = [p for p in points if p.params == n]
    series[f"N={n:.3g}"] = ([p.tokens for p in mine], [p.loss for p in mine])
    fitted[f"fit N={n:.3g}"] = (grid, fit.loss(n, grid))
    # A size's points and its fitted curve in one colour.
    colors[f"N={n:.3g}"] = colors[f"fit N={n:.3g}"] = f"C{i % 10}"
  doc.figure(plots.plot_xy(series, xlabel="tokens D", ylabel="final held-out loss",
                           title="L(N, D): runs (points) and fit (lines)", fitted=fitted,
                           logx=True, colors=colors), "chinchilla_fit", "held-out loss against tokens, per size")
  doc.heading("Fitted law and the paper's")
  doc.table(["", "E", "A", "B", "alpha", "beta", "a = beta / (alpha + beta)"],
            [["this run", fit.E, fit.A, fit.B, fit.alpha, fit.beta, fit.a],
             ["Hoffmann et al. 2022", PAPER["E"], PAPER["A"], PAPER["B"], PAPER["alpha"],
              PAPER["beta"], PAPER["a"]]])
  compute = max(6 * p.params * p.tokens for p in points)
  n_opt = fit.optimal_params(compute)
  doc.text(f"Compute-optimal size for C = {compute:.3g} FLOPs (the largest run's 6ND): "
           f"N_opt = {n_opt:.3g} non-embedding parameters, D_opt = {compute / 6 / n_opt:.3g} "
           f"tokens. Fitted a = {fit.a:.2f} against the paper's {PAPER['a']}: "
           + ("parameters and tokens grow about equally with compute, as the paper claims."
              if abs(fit.a - 0.5) <= 0.15 else
              "the tiny grid puts the optimum off the paper's equal split; its few, short "
              "runs on a small corpus weigh on the exponents."))
  doc.heading("Runs and residuals")
  doc.table(["run", "N (non-embedding)", "D (tokens)", "loss", "fit", "residual (log)"],
            [[p.name, p.params, p.tokens, p.loss, float(fit.loss(p.params, p.tokens)),
              float(math.log(p.loss) - math.log(fit.loss(p.params, p.tokens)))]
             for p in points])
  return fit, doc.write()[1]

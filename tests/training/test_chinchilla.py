"""Chinchilla approach 3: the fit recovers a known law, and the reproduction fits its own
runs (changing one run's result changes the fit) and writes its report."""

import json
import os

import numpy as np
import pytest

from configs.papers import chinchilla as chinchilla_config
from training.chinchilla import Fit, Point, analyse, collect_points, fit_scaling_law
from scripts.reproduce import reproduce

LAW = Fit(E=1.5, A=40.0, B=300.0, alpha=0.4, beta=0.3, objective=0.0)


def synthetic_points():
  return [Point(f"n{n}_d{d}", n, d, float(LAW.loss(n, d)))
          for n in (1e4, 3e4, 1e5, 3e5) for d in (1e6, 4e6, 1.6e7)]


def test_fit_recovers_a_known_law_and_follows_the_points():
  fit = fit_scaling_law(synthetic_points())
  np.testing.assert_allclose([fit.E, fit.alpha, fit.beta], [1.5, 0.4, 0.3], rtol=0.05)
  assert abs(fit.a - 0.3 / 0.7) < 0.03
  # The compute-optimal size minimises the fitted loss along C = 6 N D.
  compute = 6 * 1e5 * 4e6
  n_opt = fit.optimal_params(compute)
  sizes = n_opt * np.array([0.5, 1.0, 2.0])
  losses = fit.loss(sizes, compute / 6 / sizes)
  assert np.argmin(losses) == 1
  moved = synthetic_points()
  moved[0] = Point(moved[0].name, moved[0].params, moved[0].tokens, moved[0].loss * 1.3)
  assert fit_scaling_law(moved).alpha != pytest.approx(fit.alpha, rel=1e-3)
  with pytest.raises(ValueError, match="at least 5 runs"):
    fit_scaling_law(synthetic_points()[:4])


def test_reproduction_fits_its_runs_and_writes_the_report(tmp_path):
  workdir = str(tmp_path)
  config = chinchilla_config.get_config("test")
  fit, page = reproduce("chinchilla", workdir, "test")
  points = collect_points(config, workdir)
  assert len(points) == 6 and os.path.getsize(page) > 10_000
  assert {p.tokens for p in points} == {8 * 8 * 32, 16 * 8 * 32}
  text = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
  assert "| Hoffmann et al. 2022 | 1.69 | 406.4 | 410.7 | 0.34 | 0.28 | 0.46 |" in text
  assert points[0].name in text and os.path.exists(os.path.join(workdir, "chinchilla_fit.png"))
  # A run's result moved: the fit, read back from the runs, moves too.
  run_dir = os.path.join(workdir, "runs", points[-1].name)
  with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": 16, "eval/loss": points[-1].loss + 1.0}) + "\n")
  moved, _ = analyse(config, workdir)
  assert collect_points(config, workdir)[-1].loss == pytest.approx(points[-1].loss + 1.0)
  assert (moved.E, moved.alpha, moved.beta) != (fit.E, fit.alpha, fit.beta)

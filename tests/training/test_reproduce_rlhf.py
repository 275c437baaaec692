"""The RLHF reproductions (scripts/reproduce.py dpo_frontier, overoptimization): their pure
pieces on hand-computed values, and each reproduction's test preset end to end from one shared
base chain, its figures read back from the runs (changing a run's result changes them)."""

import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
from absl import app

from configs.papers import dpo_frontier as frontier_config
from configs.papers import overoptimization as overopt_config
from scripts.reproduce import reproduce
from training import frontier, overoptimization
from training.rlhf_runs import best_of_n, bon_kl, eval_points, train_base

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_best_of_n_picks_by_proxy_in_disjoint_groups():
  proxy = np.array([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.1, 0.0]])
  gold = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
  assert best_of_n(proxy, gold, 1) == pytest.approx((0.2875, 0.5))
  # Groups (0.1, 0.9) (0.5, 0.2) | (0.3, 0.2) (0.1, 0.0): picks 0.9, 0.5, 0.3, 0.1.
  assert best_of_n(proxy, gold, 2) == pytest.approx((0.45, 0.5))
  assert best_of_n(proxy, gold, 4) == pytest.approx((0.6, 1.0))
  assert bon_kl(1) == 0.0 and bon_kl(4) == pytest.approx(math.log(4) - 0.75)
  with pytest.raises(ValueError, match="best-of-8"):
    best_of_n(proxy, gold, 8)


def test_fits_recover_the_papers_forms_and_their_peaks():
  d = np.linspace(0.0, 3.0, 12)
  bon = overoptimization.fit_form(d, d * (0.8 - 0.2 * d), "bon")
  assert (bon.alpha, bon.beta, bon.peak_d) == pytest.approx((0.8, 0.2, 2.0))
  rl = overoptimization.fit_form(d, d * (0.5 - 0.25 * np.log(np.maximum(d, 1e-300))), "rl")
  assert (rl.alpha, rl.beta) == pytest.approx((0.5, 0.25))
  assert rl.peak_d == pytest.approx(math.e) and rl.rmse < 1e-9
  # The peak maximises the fitted curve.
  assert rl(rl.peak_d) > max(rl(rl.peak_d * 0.9), rl(rl.peak_d * 1.1))
  assert math.isinf(overoptimization.fit_form(d, 0.3 * d + 0.05 * d * d, "bon").peak_d)
  # Falling from the start: best-of-N's best is d = 0; RL's (beta > 0) a small early bump.
  assert overoptimization.fit_form(d, d * (-0.1 - 0.2 * d), "bon").peak_d == 0.0
  early = overoptimization.Fit("rl", -0.1, 0.2, 0.0)
  assert early.peak_d == pytest.approx(math.exp(-1.5)) and early(early.peak_d) > 0
  with pytest.raises(ValueError, match="two points"):
    overoptimization.fit_form(np.array([0.0, 1.0]), np.array([0.0, 0.5]), "rl")


def test_frontier_is_the_running_best_and_dominance_compares_it():
  p = frontier.Point
  points = [p("SFT", "SFT", 0.0, 0.2, 0.0), p("DPO", "a", 1.0, 0.5, 0.0),
            p("DPO", "b", 3.0, 0.4, 0.0), p("PPO", "c", 2.0, 0.45, 0.0),
            p("PPO", "d", 4.0, 0.6, 0.0), p("best-of-N", "N=2", 0.19, 0.3, 0.0)]
  kl, best = frontier.frontier(points, "DPO")
  np.testing.assert_allclose(kl, [1.0, 3.0])
  np.testing.assert_allclose(best, [0.5, 0.5])
  assert np.isnan(frontier.frontier_at(points, "PPO", np.array([1.0]))[0])
  result = frontier.dominance(points)
  # Both cover KL 2-3: there DPO 0.5 against PPO 0.45.
  assert result["overlap"] == [2.0, 3.0] and result["kl"] == [2.0, 3.0]
  assert result["dominates"] and result["gap"] == pytest.approx([0.05, 0.05])
  assert "as the paper finds" in frontier.verdict(result, 0.2, 0.01)
  points[3] = p("PPO", "c", 2.0, 0.55, 0.0)
  result = frontier.dominance(points)
  assert not result["dominates"] and result["share"] == 0.0
  text = frontier.verdict(result, 0.58, 0.06)
  assert "not reproduced" in text and "within the noise" in text and "Neither" in text
  apart = frontier.dominance([p("DPO", "a", 5.0, 0.3, 0.0), p("PPO", "b", 1.0, 0.4, 0.0)])
  assert apart["dominates"] is None and apart["kl"] == []
  assert "do not overlap" in frontier.verdict(apart, 0.2, 0.01)


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
  """The test preset's pretrain -> SFT -> reward-model chain, trained once for both."""
  root = str(tmp_path_factory.mktemp("rlhf_base"))
  train_base(frontier_config.get_config("test"), root)
  return os.path.join(root, "base")


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 100 and image.shape[1] > 100 and np.ptp(image) > 0


def test_base_runs_are_checked_and_only_for_rlhf_reproductions(tmp_path):
  with pytest.raises(app.UsageError, match="no base runs"):
    reproduce("chinchilla", str(tmp_path), "test", base_runs=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no run in"):
    reproduce("overoptimization", str(tmp_path), "test", base_runs=str(tmp_path))


def _reproduced(name, paper_config, analysis, base_runs, tmp_path):
  """Runs reproduction `name`'s test form on `base_runs`; returns (workdir, its result, the
  report page, its config and the points its analysis reads back from the runs)."""
  workdir = str(tmp_path)
  result, page = reproduce(name, workdir, "test", base_runs=base_runs)
  config = paper_config.get_config("test")
  config.base_runs = base_runs
  return workdir, result, page, config, analysis.collect_points(config, workdir)


def _sampled_evals(run_dir):
  """The rows of a run's metrics.jsonl that hold a sampled held-out evaluation."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "eval/sampled_kl" in r]


def test_dpo_frontier_reads_its_runs_and_writes_the_report(base_runs, tmp_path):
  workdir, result, page, config, points = _reproduced(
      "dpo_frontier", frontier_config, frontier, base_runs, tmp_path)
  assert [p.method for p in points].count("DPO") == 2
  assert [p.label for p in points if p.method == "best-of-N"] == ["N=1", "N=2", "N=4"]
  # PPO's points are its logged held-out evaluations after the start, value for value.
  logged = _sampled_evals(os.path.join(workdir, "runs", "ppo_kl0.1"))
  ppo = [r for r in logged if r["step"] > 0]
  assert [(p.kl, p.gold) for p in points if p.method == "PPO"] == [
      (r["eval/sampled_kl"], r["eval/sampled_answer_accuracy"]) for r in ppo]
  assert len(ppo) == 2 and result == frontier.dominance(points)
  # The judge measures the SFT policy (and so DPO's) exactly as the PPO run measured its own
  # start: the same questions, samples and keys.
  start = [r for r in logged if r["step"] == 0][0]
  sft = json.load(open(os.path.join(workdir, "evals", "sft.json")))
  for tag in ("eval/sampled_answer_accuracy", "eval/sampled_stop_rate", "eval/sampled_kl",
              "eval/response_length"):
    assert sft[tag] == pytest.approx(start[tag], abs=1e-6), tag
  assert os.path.getsize(page) > 10_000
  assert_png(os.path.join(workdir, "dpo_frontier.png"))
  text = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
  assert "Fig. 2 (left)" in text and "beta=1" in text
  # A DPO run's measured reward moved: the frontier, read back from its file, moves too.
  path = os.path.join(workdir, "evals", "dpo_beta1.json")
  figures = json.load(open(path))
  figures["eval/sampled_answer_accuracy"] = max(p.gold for p in points) + 0.5
  json.dump(figures, open(path, "w"))
  moved, _ = frontier.analyse(config, workdir)
  assert moved["best"]["DPO"] == pytest.approx(figures["eval/sampled_answer_accuracy"])
  kl = np.array([figures["eval/sampled_kl"]])
  assert frontier.frontier_at(frontier.collect_points(config, workdir), "DPO", kl)[0] == (
      pytest.approx(figures["eval/sampled_answer_accuracy"]))


def test_overoptimization_fits_its_runs_and_writes_the_report(base_runs, tmp_path):
  workdir, fits, page, config, points = _reproduced(
      "overoptimization", overopt_config, overoptimization, base_runs, tmp_path)
  rl_dir = os.path.join(workdir, "runs", "grpo_proxy")
  logged = eval_points(rl_dir)
  rl = [p for p in points if p.method == "rl"]
  assert [p.d for p in rl] == pytest.approx([math.sqrt(max(r["kl"], 0)) for r in logged])
  assert [p.gold for p in rl] == [r["gold"] for r in logged] and len(rl) == 3
  # The fits are the least squares of these very points.
  d = np.array([p.d for p in rl])
  again = overoptimization.fit_form(d, np.array([p.proxy for p in rl]) - rl[0].proxy, "rl")
  assert (fits["rl"]["proxy"].alpha, fits["rl"]["proxy"].beta) == pytest.approx(
      (again.alpha, again.beta))
  assert os.path.getsize(page) > 10_000
  for key in ("gold", "proxy"):
    assert_png(os.path.join(workdir, f"overoptimization_{key}.png"))
  text = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
  assert "d (alpha - beta log d)" in text and "Gao, Schulman & Hilton" in text
  # Moved results move the fits: the pool's gold and the RL run's last evaluation.
  pool_path = os.path.join(workdir, "evals", "bon_pool.json")
  pool = json.load(open(pool_path))
  # Gold now marks each question's proxy-best reply: best-of-N's gold rises with N.
  pool["gold"] = [[float(v == max(row)) for v in row] for row in pool["proxy"]]
  json.dump(pool, open(pool_path, "w"))
  with open(os.path.join(rl_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": 99, "eval/sampled_kl": 4.0, "eval/sampled_reward": 0.0,
                        "eval/sampled_answer_accuracy": rl[0].gold + 0.5}) + "\n")
  moved, _ = overoptimization.analyse(config, workdir)
  for method in ("bon", "rl"):
    assert (moved[method]["gold"].alpha, moved[method]["gold"].beta) != pytest.approx(
        (fits[method]["gold"].alpha, fits[method]["gold"].beta))

"""DPO's reward / KL frontier (Rafailov et al., 2023, Fig. 2 left) on the tiny world: DPO,
PPO and best-of-N from one SFT policy, each scored by the gold reward against its KL to the
SFT policy on the same held-out questions (configs/papers/dpo_frontier.py states the claim).

    points      SFT (KL 0); one per DPO run (training/rlhf_runs.py Judge); one per held-out
                evaluation after the start of each PPO run (its metrics.jsonl); one per N of
                best-of-N over the SFT policy's pool of sampled replies, KL log N - (N-1)/N
    frontier    per method, the best gold reward reached at KL <= k by its own points: the
                running maximum over them in order of KL, from its smallest KL on (the SFT
                policy is not part of it, so a method that never beats SFT shows it)
    dominance   on every KL where a DPO or PPO point lies inside the range both methods
                cover, whether DPO's frontier is at least PPO's; set against the SFT
                policy's gold and its standard error, the comparison's noise floor

`train_runs` trains and judges (writing `{workdir}/evals/*.json`); `analyse` reads only the
runs' files, so the report can be redone from them.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from configs import dpo as dpo_config
from configs.papers.dpo_frontier import PAPER
from training import plots
from training.eta import Countdown
from training.report_doc import ReportDoc
from training.rlhf_runs import (Judge, base_dirs, best_of_n, bon_kl, eval_points, read_json,
                                rl_config, set_schedule, train_base, write_json)
from training.run import run_stage

METHODS = ("DPO", "PPO", "best-of-N")


@dataclasses.dataclass(frozen=True)
class Point:
  """One policy: method, label, KL to the SFT policy (nats per reply), gold reward (share of
  sampled replies stating the answer) and proxy reward (reward-model score)."""
  method: str
  label: str
  kl: float
  gold: float
  proxy: float


def run_configs(config: ml_collections.ConfigDict, workdir: str
                ) -> list[tuple[str, str, ml_collections.ConfigDict]]:
  """(method, run dir, config) of every DPO and PPO run, all from the base SFT run."""
  dirs = base_dirs(config, workdir)
  runs = []
  for beta in config.dpo_betas:
    run = dpo_config.get_config("tiny")
    run.init_from = dirs["sft"]
    run.objective.beta = beta
    set_schedule(run, config.dpo_steps, warmup=10)
    if config.eval.num_prompts < 64:
      run.train.eval_steps = 2
    runs.append(("DPO", os.path.join(workdir, "runs", f"dpo_beta{beta:g}"), run))
  for kl_coef in config.ppo_kl_coefs:
    run = rl_config(config, dirs, "ppo")
    run.objective.kl_coef = kl_coef
    run.train.update(dict(steps=config.ppo_steps, eval_every=config.ppo_eval_every))
    run.checkpoint.every_steps = config.ppo_steps
    runs.append(("PPO", os.path.join(workdir, "runs", f"ppo_kl{kl_coef:g}"), run))
  return runs


def _eval_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "evals", f"{name}.json")


def train_runs(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the base chain, every DPO and PPO run (finished ones cost a resume check), then
  judges the SFT and DPO policies and draws the SFT policy's best-of-N pool (kept)."""
  dirs = train_base(config, workdir)
  runs = run_configs(config, workdir)
  countdown = Countdown(len(runs))
  for k, (_, run_dir, run) in enumerate(runs, start=1):
    print(f"== {countdown.line(k, 'run', os.path.basename(run_dir))}", flush=True)
    run_stage(run, run_dir)
  todo = [("sft", dirs["sft"])] + [(os.path.basename(d), d) for m, d, _ in runs if m == "DPO"]
  todo = [(name, d) for name, d in todo if not os.path.exists(_eval_path(workdir, name))]
  pool_path = _eval_path(workdir, "bon_pool")
  if not todo and os.path.exists(pool_path):
    return
  judge = Judge(config, dirs, workdir)
  for name, run_dir in todo:
    write_json(_eval_path(workdir, name), judge.figures(run_dir))
  if not os.path.exists(pool_path):
    write_json(pool_path, judge.pool(dirs["sft"], max(config.bon_ns)))


def collect_points(config: ml_collections.ConfigDict, workdir: str) -> list[Point]:
  """Every policy's point, read back from the runs' files (SFT first)."""
  sft = read_json(_eval_path(workdir, "sft"))
  points = [Point("SFT", "SFT", sft["eval/sampled_kl"], sft["eval/sampled_answer_accuracy"],
                  sft["eval/sampled_reward"])]
  for method, run_dir, run in run_configs(config, workdir):
    name = os.path.basename(run_dir)
    if method == "DPO" and os.path.exists(_eval_path(workdir, name)):
      f = read_json(_eval_path(workdir, name))
      points.append(Point("DPO", f"beta={run.objective.beta:g}", f["eval/sampled_kl"],
                          f["eval/sampled_answer_accuracy"], f["eval/sampled_reward"]))
    elif method == "PPO" and os.path.exists(run_dir):
      for p in eval_points(run_dir):
        if p["step"] > 0:  # step 0 is the SFT policy itself
          points.append(Point("PPO", f"kl_coef={run.objective.kl_coef:g}, it {p['step']:g}",
                              p["kl"], p["gold"], p["proxy"]))
  pool = read_json(_eval_path(workdir, "bon_pool"))
  proxy, gold = np.asarray(pool["proxy"]), np.asarray(pool["gold"])
  for n in config.bon_ns:
    p, g = best_of_n(proxy, gold, n)
    points.append(Point("best-of-N", f"N={n}", bon_kl(n), g, p))
  return points


def frontier(points: list[Point], method: str) -> tuple[np.ndarray, np.ndarray]:
  """(kl, best gold at KL <= kl) of `method`'s own points, by KL."""
  mine = sorted((p.kl, p.gold) for p in points if p.method == method)
  kl = np.asarray([k for k, _ in mine])
  return kl, np.maximum.accumulate(np.asarray([g for _, g in mine]))


def frontier_at(points: list[Point], method: str, kl: np.ndarray) -> np.ndarray:
  """`method`'s frontier at each of `kl` (NaN below its smallest KL)."""
  ks, best = frontier(points, method)
  index = np.searchsorted(ks, kl, side="right") - 1
  return np.where(index >= 0, best[np.maximum(index, 0)], np.nan)


def dominance(points: list[Point], first: str = "DPO", second: str = "PPO") -> dict:
  """Whether `first`'s frontier is at least `second`'s (module docstring): the KL range both
  cover (`overlap`), the KLs compared in it, the gaps first - second there, the share where
  the gap is >= 0, `dominates` (None when the ranges do not overlap), and each method's KL
  range and best gold.

  Raises:
    ValueError: either method has no point (its runs are missing or logged no evaluation).
  """
  missing = [m for m in (first, second) if not any(p.method == m for p in points)]
  if missing:
    raise ValueError(f"no {' or '.join(missing)} points: train the runs first")
  kls = {m: [p.kl for p in points if p.method == m] for m in (first, second)}
  low, high = max(min(k) for k in kls.values()), min(max(k) for k in kls.values())
  grid = np.unique([k for m in (first, second) for k in kls[m] if low <= k <= high])
  gap = frontier_at(points, first, grid) - frontier_at(points, second, grid)
  best = {m: max(p.gold for p in points if p.method == m) for m in (first, second)}
  compared = grid.size > 0
  return dict(kl=grid.tolist(), gap=gap.tolist(), overlap=[float(low), float(high)],
              share=float(np.mean(gap >= 0)) if compared else None,
              mean_gap=float(np.mean(gap)) if compared else None,
              min_gap=float(np.min(gap)) if compared else None,
              dominates=bool(np.all(gap >= 0)) if compared else None,
              ranges={m: [float(min(k)), float(max(k))] for m, k in kls.items()}, best=best)


def verdict(result: dict, sft_gold: float, noise: float) -> str:
  """The comparison with the paper's claim, in words, from `dominance`'s result, the SFT
  policy's gold reward and `noise` (two standard errors of a gold figure)."""
  ranges = result["ranges"]
  span = lambda m: f"{ranges[m][0]:.2f}-{ranges[m][1]:.2f} nats"
  if result["dominates"] is None:
    text = (f"DPO's and PPO's KLs do not overlap (DPO {span('DPO')}, PPO {span('PPO')}): "
            "no comparison at equal KL, so the paper's claim is neither confirmed nor "
            "refuted here")
  else:
    where = (f"at {len(result['kl'])} KLs in {result['overlap'][0]:.2f}-"
             f"{result['overlap'][1]:.2f} nats, the range both cover (DPO {span('DPO')}, "
             f"PPO {span('PPO')}); mean gap DPO - PPO {result['mean_gap']:+.3f}, smallest "
             f"{result['min_gap']:+.3f}")
    if result["dominates"]:
      text = f"DPO's frontier is at least PPO's {where}: as the paper finds"
    else:
      text = (f"DPO's frontier is not above PPO's: at least PPO's at {result['share']:.0%} "
              f"of the compared KLs ({where}); the paper's claim is not reproduced here")
    if max(abs(g) for g in result["gap"]) <= noise:
      text += f", though every gap is within the noise (two standard errors, {noise:.3f})"
  gains = {m: g - sft_gold for m, g in result["best"].items()}
  if all(g <= noise for g in gains.values()):
    text += (f". Neither method beats the SFT policy's gold reward ({sft_gold:.3f}) by more "
             f"than the noise on these held-out questions (best DPO {result['best']['DPO']:.3f}, "
             f"PPO {result['best']['PPO']:.3f}): the frontiers compare policies that all lose "
             "or keep what SFT had, not ones that gain")
  return text + "."


def analyse(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, str]:
  """The points, frontiers and DPO-vs-PPO comparison, written to `{workdir}/report.{md,html}`;
  returns (the comparison, the HTML path)."""
  points = collect_points(config, workdir)
  result = dominance(points)
  # The held-out questions actually there (the tiny world holds out 37 distinct ones).
  questions = len(read_json(_eval_path(workdir, "bon_pool"))["gold"])
  samples = questions * config.eval.samples
  sft = points[0]
  bon = max((p for p in points if p.method == "best-of-N"), key=lambda p: p.gold)
  stderr = float(np.sqrt(max(sft.gold * (1 - sft.gold), 1e-6) / samples))
  doc = ReportDoc("DPO's reward / KL frontier on the tiny world", workdir)
  doc.text(f"{PAPER['figure']}: {PAPER['claim']}. Here: DPO at beta {list(config.dpo_betas)}, "
           f"PPO with the gold reward (PPO-GT) at KL coefficients {list(config.ppo_kl_coefs)}, "
           f"best-of-N by the learned reward model at N {list(config.bon_ns)}, all from one "
           f"SFT policy; gold reward = share of {config.eval.samples} sampled replies to each "
           f"of {questions} held-out questions stating the answer (standard "
           f"error about {stderr:.3f} at the SFT policy's {sft.gold:.3f}). KL to the SFT "
           "policy: the exact per-token KL summed along the same sampled replies for every "
           "trained policy; for best-of-N the analytic log N - (N - 1) / N.")
  series, lines, colors = {}, {}, {}
  for k, method in enumerate(("SFT",) + METHODS):
    colors[method] = colors[f"{method} frontier"] = f"C{k}"
    mine = [p for p in points if p.method == method]
    series[method] = ([p.kl for p in mine], [p.gold for p in mine])
    if method != "SFT":
      kl, best = frontier(points, method)
      # A staircase: the best reward holds from one point's KL to the next's.
      lines[f"{method} frontier"] = (np.repeat(kl, 2)[1:], np.repeat(best, 2)[:-1])
  doc.figure(plots.plot_xy(series, xlabel="KL(pi || pi_SFT), nats per reply",
                           ylabel="gold reward (held-out answer accuracy)",
                           title="reward vs KL: points and per-method frontiers",
                           fitted=lines, colors=colors),
             "dpo_frontier", "gold reward against KL to the SFT policy, per method")
  doc.heading("DPO's frontier against PPO's")
  doc.text(verdict(result, sft.gold, 2 * stderr) + f" Best gold reached: DPO "
           f"{result['best']['DPO']:.3f}, PPO {result['best']['PPO']:.3f}, best-of-N "
           f"{bon.gold:.3f} (at {bon.label}, KL {bon.kl:.2f}), SFT {sft.gold:.3f} (standard "
           f"error {stderr:.3f}).")
  doc.table(["KL", "DPO frontier", "PPO frontier", "gap"],
            [[k, float(frontier_at(points, "DPO", np.asarray([k]))[0]),
              float(frontier_at(points, "PPO", np.asarray([k]))[0]), g]
             for k, g in zip(result["kl"], result["gap"])])
  doc.heading("Every policy")
  doc.table(["method", "policy", "KL to SFT", "gold reward", "proxy (reward model)"],
            [[p.method, p.label, p.kl, p.gold, p.proxy] for p in points])
  return result, doc.write()[1]

"""What the RLHF reproductions share (training/frontier.py, training/overoptimization.py):
the pretrain -> SFT -> reward-model chain they start from, RL stage configs on the same
held-out questions, and a `Judge` that scores any policy run on those questions.

    base runs      {base}/pretrain, {base}/sft, {base}/reward: configs/{pretrain,sft,reward}.py
                   :tiny chained by init_from as scripts/pipeline.py does, with the
                   reproduction's step counts; {base} is `config.base_runs` when set (reused,
                   never trained), else {workdir}/base (trained, or resumed)
    rl_config      an RL stage config from the SFT run whose held-out evaluation (questions,
                   samples per question, reply length, sampling keys) is the reproduction's
    Judge          training/rl/evaluation.py's Evaluator with the SFT policy as reference and
                   the reward model as its reward, on any policy run's params (a DPO run:
                   the same eval/* figures an RL run logs about itself), and best-of-N pools:
                   N sampled replies per question from a policy with their proxy (reward
                   model) and gold (answer check) scores

Every figure a reproduction fits is written under its workdir as JSON (`write_json`) or read
from a run's metrics.jsonl (`eval_points`), so its analysis reruns from files alone.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import ml_collections
import numpy as np

from configs.run_layout import has_run_config
from data.pipeline import resolve_tokenizer
from data.prompts import load_prompts
from training.eta import Countdown
from training.metrics import read_metrics
from training.rl.loop import RLTrainer
from training.rl.policy import InitSources, restore_initial_params
from training.rl.rollout import repeat_items
from training.run import run_stage

BASE_STAGES = ("pretrain", "sft", "reward")


def base_dirs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """{stage: run dir} of the base chain (module docstring)."""
  root = config.base_runs or os.path.join(workdir, "base")
  return {stage: os.path.join(root, stage) for stage in BASE_STAGES}


def set_schedule(run: ml_collections.ConfigDict, steps: int, warmup: int) -> None:
  """`steps` steps, evaluated and saved at the end, logged about 10 times."""
  run.train.update(dict(steps=steps, eval_every=steps, log_every=max(1, min(20, steps // 10))))
  run.checkpoint.every_steps = steps
  run.optimizer.warmup_steps = max(1, min(warmup, steps // 5))


def base_configs(config: ml_collections.ConfigDict, workdir: str
                 ) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(run dir, config) of pretrain, SFT and the reward model, each from the one before."""
  dirs = base_dirs(config, workdir)
  small = config.eval.num_prompts < 64   # the quick and test presets' shorter evaluations
  runs = []
  for stage, steps, warmup in (("pretrain", config.pretrain_steps, 50),
                               ("sft", config.sft_steps, 20),
                               ("reward", config.reward_steps, 10)):
    run = importlib.import_module(f"configs.{stage}").get_config("tiny")
    set_schedule(run, steps, warmup)
    if stage != "pretrain":
      run.init_from = dirs["sft" if stage == "reward" else "pretrain"]
    if small:
      run.train.eval_steps = 2
    if stage == "sft":
      run.eval.update(dict(num_prompts=config.eval.num_prompts,
                           batch_size=config.eval.num_prompts))
    runs.append((dirs[stage], run))
  return runs


def train_base(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Trains (or resumes) the base chain in {workdir}/base; with `config.base_runs` only
  checks that its runs exist. Returns `base_dirs`.

  Raises:
    FileNotFoundError: `config.base_runs` lacks one of the pretrain / sft / reward runs.
  """
  dirs = base_dirs(config, workdir)
  if config.base_runs:
    missing = [d for d in dirs.values() if not has_run_config(d)]
    if missing:
      raise FileNotFoundError(f"config.base_runs {config.base_runs!r}: no run in {missing}")
    return dirs
  runs = base_configs(config, workdir)
  countdown = Countdown(len(runs))
  for k, (run_dir, run) in enumerate(runs, start=1):
    print(f"== {countdown.line(k, 'base run', os.path.basename(run_dir))}", flush=True)
    run_stage(run, run_dir)
  return dirs


def rl_config(config: ml_collections.ConfigDict, dirs: dict[str, str], module: str,
              preset: str = "tiny") -> ml_collections.ConfigDict:
  """configs/{module}.py:{preset} from the SFT run, evaluated as every policy of the
  reproduction is: `config.eval`'s questions, samples and reply length (the rollouts'
  replies are as long), one batch of questions at a time."""
  run = importlib.import_module(f"configs.{module}").get_config(preset)
  run.init_from = dirs["sft"]
  run.eval.update(dict(num_prompts=config.eval.num_prompts, samples=config.eval.samples,
                       max_new_tokens=config.eval.max_new_tokens,
                       batch_size=config.eval.num_prompts))
  run.rl.max_new_tokens = config.eval.max_new_tokens
  return run


def eval_points(run_dir: str) -> list[dict[str, float]]:
  """Every held-out evaluation a run logged, in step order: step, kl (eval/sampled_kl), gold
  (eval/sampled_answer_accuracy) and proxy (eval/sampled_reward: the run's own reward)."""
  points = []
  for record in read_metrics(run_dir):
    if "eval/sampled_kl" in record and "eval/sampled_answer_accuracy" in record:
      points.append(dict(step=float(record["step"]), kl=float(record["eval/sampled_kl"]),
                         gold=float(record["eval/sampled_answer_accuracy"]),
                         proxy=float(record.get("eval/sampled_reward", np.nan))))
  return sorted(points, key=lambda p: p["step"])


def write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True)


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def bon_kl(n: int) -> float:
  """The analytic KL of best-of-N to the sampling policy, log N - (N - 1) / N (Stiennon
  et al., 2020, app. G.3; Gao et al., 2023, sec. 2.2): an upper bound, exact for a continuous
  reward without ties."""
  return float(np.log(n) - (n - 1) / n)


def best_of_n(proxy: np.ndarray, gold: np.ndarray, n: int) -> tuple[float, float]:
  """Mean (proxy, gold) of the best-of-`n` reply by `proxy`, over the disjoint groups of `n`
  of each prompt's pool (`proxy`, `gold` `[prompts, samples]`; the first in a group wins a
  tie). Every sample is used once, so the estimate has the pool's variance, not one draw's."""
  prompts, samples = proxy.shape
  if n < 1 or n > samples:
    raise ValueError(f"best-of-{n} needs 1 <= N <= {samples} samples per prompt")
  groups = samples // n
  p = proxy[:, :groups * n].reshape(prompts, groups, n)
  g = gold[:, :groups * n].reshape(prompts, groups, n)
  pick = np.argmax(p, axis=-1)[..., None]
  return (float(np.take_along_axis(p, pick, -1).mean()),
          float(np.take_along_axis(g, pick, -1).mean()))


class Judge:
  """Scores policy runs on the reproduction's held-out questions (module docstring): one RL
  evaluation set-up (configs/grpo.py:tiny from the SFT run, rewarded by the reward model
  alone with no missing-stop penalty), compiled once, into which each run's params load."""

  def __init__(self, config: ml_collections.ConfigDict, dirs: dict[str, str], workdir: str):
    run = rl_config(config, dirs, "grpo")
    run.reward.update(dict(function="", model=dirs["reward"], missing_stop_penalty=0.0))
    self.run = run
    judge_dir = os.path.join(workdir, "judge")
    tokenizer = resolve_tokenizer(run.data, judge_dir)
    train_items = load_prompts(run, tokenizer, "train", judge_dir)
    self.items = load_prompts(run, tokenizer, "eval", judge_dir, distinct=True,
                              limit=run.eval.num_prompts)
    self.trainer = RLTrainer(run, tokenizer=tokenizer, train_items=train_items,
                             eval_items=self.items)
    self._fresh = self.trainer.setup.fresh_state()["params"]
    self._pool_sampler = None

  def params(self, run_dir: str):
    """The policy params of the run at `run_dir` (any decoder run: SFT, DPO, RL)."""
    return restore_initial_params(self._fresh, self.trainer.setup.abstract_state["params"],
                                  InitSources(run_dir))

  def figures(self, run_dir: str) -> dict[str, float]:
    """The held-out eval/* figures of the run's policy, exactly as an RL run logs its own
    (greedy and sampled reward, answer accuracy, KL to the SFT policy)."""
    out = self.trainer.evaluator.evaluate(self.params(run_dir), self.items, "eval")
    return {f"eval/{k}": v for k, v in out.items()}

  def pool(self, run_dir: str, samples: int, seed: int = 1) -> dict[str, list]:
    """`samples` replies per held-out question from the run's policy at the rollouts'
    sampling settings: {proxy, gold, stopped} `[questions][samples]` (reward-model score,
    answer check, ended with a stop token)."""
    engine, rl = self.trainer.engine, self.run.rl
    if self._pool_sampler is None:
      self._pool_sampler = engine.make_sampler(self.run.eval.max_new_tokens,
                                               temperature=rl.temperature, top_k=rl.top_k,
                                               top_p=rl.top_p)
    params, size = self.params(run_dir), self.run.eval.batch_size
    items = repeat_items(self.items, samples)
    proxy, gold, stopped = [], [], []
    for batch, start in enumerate(range(0, len(items), size)):
      part = list(items[start:start + size])
      real = len(part)
      part += [part[0]] * (size - real)  # full batches: one compile
      key = jax.random.fold_in(jax.random.PRNGKey(seed), batch)
      rows, _, replies, stop = engine.sample(self._pool_sampler, params, part, key)
      prompts = [it.prompt for it in part]
      proxy.extend(engine.score(rows, replies, stop, prompts)[:real].tolist())
      gold.extend(float(c) for c in engine.check_answers(replies[:real], prompts[:real]))
      stopped.extend(bool(s) for s in stop[:real])
    shape = lambda values: np.asarray(values).reshape(len(self.items), samples).tolist()
    return dict(proxy=shape(proxy), gold=shape(gold), stopped=shape(stopped))

"""`train_rl(config, workdir)`: the sample -> score -> update loop of PPO, GRPO, RLOO, online DPO.

An RL run counts *iterations*: `config.train.steps`, `eval_every`, `log_every` and
`config.checkpoint.every_steps` are in iterations, and each iteration makes
`rl.epochs x rl.minibatches` optimizer updates (the learning-rate schedule and
`optimizer.warmup_steps` count updates). One iteration:

    prompts (`rl.prompts_per_iteration`, each `rl.samples_per_prompt` times)
      -> rollout (training/rl/rollout.py): sample, score (with `rl.dynamic_sampling`, more
         rounds until the groups carry a signal), log-probs, values       [generate, score]
      -> the algorithm's arrays (training/rl/ppo.py, grpo.py, online_dpo.py)
      -> `rl.epochs` passes over them in `rl.minibatches` shuffled minibatches, each one step
         of training/step.py's jitted, sharded, donated train step                  [update]
      -> the next KL coefficient (PPO's adaptive controller)

pi_old's forward pass: the rollout's policy log-probs are the ratios' denominators of every
update after the first. When there is no such update (`rl.epochs` = `rl.minibatches` = 1: the
one update is on-policy) and the algorithm's loss can read its own log-probs under
stop_gradient as log pi_old (GRPO, RLOO: `Algorithm.reuses_log_probs`), the rollout skips the
policy's pass: the loss and gradient are exactly those with it (ratio 1, gradient
grad rho = grad log pi), and `train/kl` comes from the loss's `reply_kl`.

Packed updates (`rl.pack_updates`, training/rl/packing.py): each minibatch's episodes are
packed into rows with segment ids instead of one padded row each; `train/pack_efficiency`
is the share of the update's row slots holding tokens, packed or not. The first
minibatch's ratio is then 1 up to float rounding (the scoring pass runs on unpacked rows).

Off-policy rollouts (`rl.staleness` k, `rl.rollout_devices`, training/rl/offpolicy.py):
iteration t trains on a rollout sampled with the weights of iteration max(t - k, 0), sampled
(on devices of its own) while earlier updates ran, with truncated importance weights
pi_old / mu (`rl.max_importance_ratio`) on the policy loss. The checkpoint then also holds
the weights of the rollouts in flight, which a resumed run regenerates. Int8 rollouts
(`rl.rollout_weights: int8`, models/quantize.py) sample from the quantized policy mu and take
the same correction, at any staleness.

Sections below: start-up; prompts; models (`RLTrainer`: the trained ActorCritic built by
training/setup.py, the frozen reference and reward model loaded by training/runs.py) and state
(fresh from `config.init_from`, or resumed); the loop: training/outer_loop.py's, shared with
the supervised loop (logging windows, evaluation, checkpoints), one step per iteration. The
checkpoint holds the train state plus `rl`: the iteration counter and the KL coefficient; the
prompts (every sampling round's), sampling seeds and minibatch order are pure functions of
(seed, iteration), so rerunning the command resumes exactly.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from data.pipeline import resolve_tokenizer
from data.verifiers import get_answer_checker, get_reward_function
from data.prompts import load_prompts
from models.build import build_model_spec
from models.lora import is_enabled as lora_enabled
from models.quantize import check_format
from models.sampler import check_length
from objectives.reductions import add_metrics, finalize_metrics
from parallel.distributed import maybe_initialize_distributed
from parallel.host_data import batch_shards, to_global
from training.outer_loop import (OuterLoop, StepResult, open_checkpointer, open_run,
                                 open_writer)
from training.rl import rewards
from training.rl.algorithms import get_algorithm
from training.rl.evaluation import Evaluator
from training.rl.offpolicy import StaleRollouts, importance_arrays, split_devices
from training.rl.packing import pack_episodes
from training.rl.policy import InitSources, build_actor_critic_spec, restore_initial_params
from training.rl.rollout import (RolloutEngine, chunk_indices, draw_groups, prompt_batch,
                                 repeat_items, rollout_metrics)
from training.runs import init_params, load_params
from training.setup import build_setup
from training.stage import Stage


def minibatch_plan(units: int, epochs: int, minibatches: int, seed: int, iteration: int
                   ) -> list[list[np.ndarray]]:
  """Per epoch, `minibatches` index arrays: a fresh permutation of `range(units)` split into
  equal parts (a pure function of seed and iteration)."""
  plan = []
  for epoch in range(epochs):
    order = np.random.default_rng([seed, iteration, epoch]).permutation(units)
    plan.append([order[i] for i in chunk_indices(units, minibatches)])
  return plan


def _rl_state(iteration: int, kl_coef: float, mesh) -> dict[str, jax.Array]:
  replicated = NamedSharding(mesh, P())
  return {"iteration": jax.device_put(np.int32(iteration), replicated),
          "kl_coef": jax.device_put(np.float32(kl_coef), replicated)}


def initial_kl_coef(config: ml_collections.ConfigDict) -> float:
  return float(np.float32(config.objective.get("kl_coef", 0.0)))


def _check_batch_sizes(config: ml_collections.ConfigDict, units: str, shards: int) -> None:
  """Rollout rows, minibatches and evaluation batches must split evenly over the mesh."""
  rl = config.rl
  rows = rl.prompts_per_iteration * rl.samples_per_prompt
  count = rows if units == "rows" else rl.prompts_per_iteration
  if count % rl.minibatches or (count // rl.minibatches) % shards or rows % shards:
    raise ValueError(f"{rows} rollout rows ({count} {units}) in {rl.minibatches} minibatches: "
                     f"every minibatch and the rollout must be a multiple of the {shards} "
                     "ways the batch splits over the mesh (config.rl.prompts_per_iteration, "
                     "samples_per_prompt, minibatches)")
  if config.train.eval_every and config.eval.batch_size % shards:
    raise ValueError(f"config.eval.batch_size {config.eval.batch_size} is not a multiple of "
                     f"the {shards} ways the batch splits over the mesh")
  if rl.dynamic_sampling and rl.samples_per_prompt < 2:
    raise ValueError("config.rl.dynamic_sampling drops groups of equal scores: it needs "
                     f"config.rl.samples_per_prompt >= 2, got {rl.samples_per_prompt}")


class RLTrainer:
  """The models, state and jitted functions of one RL run (used by `train_rl` and the PPO
  benchmark, which builds one on random params)."""

  def __init__(self, config: ml_collections.ConfigDict, *, tokenizer, train_items,
               eval_items=None, reward_model=None, old_log_probs_forward: bool | None = None,
               stale_rollouts: bool | None = None):
    """`reward_model` (a rewards.RewardModelScorer) overrides `config.reward.model`.
    `old_log_probs_forward`: run the policy's forward pass for log pi_old even where the
    update is on-policy and the loss could skip it (True; tests and the benchmark compare
    the two) or not (False: an error where it is needed); None decides (module docstring).
    `stale_rollouts`: draw through training/rl/offpolicy.py's StaleRollouts even at
    `rl.staleness` 0 on one mesh (True; a test compares it with the synchronous draw); None:
    where `rl.staleness` or `rl.rollout_devices` asks for it."""
    if lora_enabled(config):
      raise ValueError("config.lora.enabled: the RL stages train full policies (LoRA "
                       "adapters are not wired into the rollout's sampler)")
    self.config = config
    self.algorithm = get_algorithm(config.objective.name)
    self.train_items = train_items
    rl = config.rl
    check_format(rl.rollout_weights, "config.rl.rollout_weights")
    # Stale rollouts weigh tokens by pi_old / mu: pi_old's pass is needed; so do int8
    # rollouts (mu is the quantized policy).
    quantized = rl.rollout_weights != "compute"
    skippable = (self.algorithm.reuses_log_probs and rl.epochs * rl.minibatches == 1
                 and rl.staleness == 0 and not quantized)
    if old_log_probs_forward is False and not skippable:
      raise ValueError(f"{self.algorithm.name} with {rl.epochs} epoch(s) x {rl.minibatches} "
                       f"minibatch(es), staleness {rl.staleness} and {rl.rollout_weights} "
                       "rollout weights needs pi_old's forward pass")
    self.old_log_probs_forward = (not skippable if old_log_probs_forward is None
                                  else old_log_probs_forward)
    spec = build_actor_critic_spec(config.model, self.algorithm.value_source(config))
    stage = Stage(name=self.algorithm.name, loss_fn=self.algorithm.loss_fn, make_dataset=None)
    # Off-policy rollouts on devices of their own: the training mesh has the others.
    train_devices, rollout_mesh = split_devices(config)
    # The schedule counts optimizer updates: rl.epochs x rl.minibatches per iteration.
    self.setup = build_setup(config, stage, spec=spec, devices=train_devices,
                             total_updates=config.train.steps * rl.epochs * rl.minibatches)
    self.mesh, self.rules, self.spec = self.setup.mesh, self.setup.rules, spec
    _check_batch_sizes(config, self.algorithm.units, batch_shards(self.mesh, self.rules))
    # Learned position tables end at max_length: prompt + reply must fit.
    check_length(self.spec, rl.max_prompt_len,
                 max(rl.max_new_tokens, config.eval.max_new_tokens if eval_items else 0))
    ref_spec = build_model_spec(config.model, "decoder")
    ref_path = config.objective.reference or config.init_from
    # No reference run: random weights (benchmarks only; a training run has init_from).
    ref_params = (load_params(ref_path, ref_spec, self.mesh, self.rules) if ref_path
                  else init_params(ref_spec, self.mesh, self.rules, seed=2))
    # The run's answer check (config.data.answer_checker), resolved once: rewards, rollout
    # and evaluation answer accuracy all use it.
    checker = get_answer_checker(config.data.answer_checker)
    if reward_model is None and config.reward.model:
      reward_model = rewards.RewardModelScorer.from_run(config.reward.model, self.mesh,
                                                        self.rules)
    self.engine = RolloutEngine(config, self.spec, tokenizer, self.mesh, self.rules,
                                ref_spec=ref_spec, ref_params=ref_params,
                                reward_fn=get_reward_function(config.reward.function, checker),
                                answer_check=checker,
                                reward_model=reward_model)
    self.evaluator = None
    if eval_items:
      # Greedy and sampled figures on held-out prompts, and on (distinct) prompts RL trains
      # on.
      seen, distinct = set(), []
      for item in train_items:
        if item.tokens not in seen and len(distinct) < config.eval.num_prompts:
          seen.add(item.tokens)
          distinct.append(item)
      self.evaluator = Evaluator(self.engine, {"eval": eval_items, "eval_train": distinct},
                                 batch_size=config.eval.batch_size,
                                 max_new_tokens=config.eval.max_new_tokens,
                                 samples=config.eval.samples, seed=config.seed,
                                 sampling=dict(temperature=rl.temperature, top_k=rl.top_k,
                                               top_p=rl.top_p))
    self.train_step = self.setup.train_step()
    self.rollouts = None
    if stale_rollouts or (stale_rollouts is None
                          and (rl.staleness or rollout_mesh or quantized)):
      ways = batch_shards(rollout_mesh or self.mesh, self.rules)
      if (rl.prompts_per_iteration * rl.samples_per_prompt) % ways:
        raise ValueError(f"config.rl.rollout_devices {rl.rollout_devices}: the "
                         f"{rl.prompts_per_iteration * rl.samples_per_prompt} rollout rows "
                         f"do not split over the {ways} ways of the rollout mesh")
      self.rollouts = StaleRollouts(config, self.engine, spec, self.rules, rollout_mesh,
                                    draw_iteration=self.draw, first_round=self.first_round)
    if rl.pack_updates and self.algorithm.units != "rows":
      raise ValueError(f"config.rl.pack_updates: {self.algorithm.name} updates on preference "
                       "pairs, not reply rows; packing is for PPO, GRPO and RLOO")
    # Packed minibatches keep whole micro-batches on every way the batch splits.
    self.pack_multiple = (batch_shards(self.mesh, self.rules)
                          * max(config.train.grad_accum_steps, 1))

  def fresh_state(self):
    """A new train state with the policy from `init_from` (and the critic from
    `value.init_from`, else the reward model, else `init_from`)."""
    config = self.config
    state = self.setup.fresh_state()
    critic = config.value.init_from or config.reward.model or config.init_from
    params = restore_initial_params(state["params"], self.setup.abstract_state["params"],
                                    InitSources(config.init_from, critic))
    return dict(state, params=params)

  def first_round(self, iteration: int) -> tuple[list, jax.Array]:
    """Iteration `iteration`'s sampling key and round-0 prompts, each repeated G times."""
    config = self.config
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
    return self._round_items(iteration, 0), rng

  def _round_items(self, iteration: int, r: int) -> list:
    rl = self.config.rl
    return repeat_items(prompt_batch(self.train_items, iteration, rl.prompts_per_iteration,
                                     self.config.seed, stream=r), rl.samples_per_prompt)

  def draw(self, drawer, params, iteration: int):
    """Iteration `iteration`'s rollout (not yet completed), sampled by `drawer` (the engine,
    or offpolicy.py's rollout devices) with `params`: (rollout, seconds, figures)."""
    rl = self.config.rl
    items, rng = self.first_round(iteration)
    if rl.dynamic_sampling:
      round_items = lambda r: items if r == 0 else self._round_items(iteration, r)
      return draw_groups(drawer, params, round_items, rng, groups=rl.prompts_per_iteration,
                         g=rl.samples_per_prompt,
                         max_extra_rounds=rl.dynamic_sampling_max_rounds)
    rollout, times = drawer.draw(params, items, rng)
    return rollout, times, {}

  def iteration(self, state, iteration: int, kl_coef: float):
    """One sample -> score -> update iteration; returns (state, figures, next kl_coef)."""
    config, rl = self.config, self.config.rl
    g, prompts = rl.samples_per_prompt, rl.prompts_per_iteration
    rows = prompts * g
    units = rows if self.algorithm.units == "rows" else prompts
    plan = minibatch_plan(units, rl.epochs, rl.minibatches, config.seed, iteration)
    # Rows are scored in the first epoch's minibatches, so its first update recomputes the
    # very same log-probs (ratio 1); pairs need no such care.
    chunks = plan[0] if self.algorithm.units == "rows" else chunk_indices(rows, rl.minibatches)
    params = state["params"]
    if self.rollouts is None:
      rollout, times, figures = self.draw(self.engine, params, iteration)
      figures["staleness"] = 0.0
    else:  # dispatches later iterations' rollouts with these params (offpolicy.py)
      rollout, times, figures = self.rollouts.next(iteration, params)
    start = time.perf_counter()
    rollout = self.engine.complete(params, rollout, chunks, policy=self.old_log_probs_forward)
    times["score_s"] += time.perf_counter() - start
    arrays, batch_figures = self.algorithm.make_batch(rollout, config, kl_coef)
    figures.update(batch_figures)
    if rollout.behaviour_log_probs is not None and self.algorithm.units == "rows":
      weights, weight_figures = importance_arrays(rollout, rl.max_importance_ratio)
      arrays.update(weights)
      figures.update(weight_figures)
    figures.update(rollout_metrics(rollout))

    start = time.perf_counter()
    total, first = None, None
    real, slots, updates = 0, 0, 0
    for epoch in plan:
      for index in epoch:
        part = (pack_episodes(arrays, index, multiple=self.pack_multiple) if rl.pack_updates
                else {k: v[index] for k, v in arrays.items()})
        if self.algorithm.units == "rows":
          real += int((part["segment_ids"] > 0).sum())
          slots, updates = slots + part["tokens"].size, updates + 1
        batch = to_global(part, self.mesh, self.rules)
        state, metrics = self.train_step(state, batch)
        first = metrics if first is None else first
        total = metrics if total is None else add_metrics(total, metrics)
    jax.block_until_ready(state["params"])
    times["update_s"] = time.perf_counter() - start
    figures.update({k: float(v) for k, v in finalize_metrics(total).items()})
    if updates:  # reply rows: the share of their slots that hold tokens (packing.py)
      figures["pack_efficiency"] = real / slots
      figures["update_rows"] = slots / updates / arrays["tokens"].shape[1]
    if rollout.log_probs is None:
      # No policy pass in the rollout: the one (on-policy) update's loss measured the KL.
      figures["kl"] = figures["reply_kl"]
    first = {k: float(v) for k, v in finalize_metrics(first).items()}
    if "ratio" in first:  # 1 exactly: the rollout's log-probs are the policy's own
      figures["ratio_first_minibatch"] = first["ratio"]
    if self.algorithm.next_kl_coef is not None:
      kl_coef = self.algorithm.next_kl_coef(config, kl_coef, figures, rows)
    record = {f"train/{k}": v for k, v in figures.items()}
    record.update({f"perf/{k}": v for k, v in times.items()})
    record["perf/iteration_s"] = sum(times.values())
    return state, record, float(np.float32(kl_coef))


def format_rl_progress(iteration: int, total: int, record: dict) -> str:
  parts = [f"iter {iteration:>4}/{total}"]
  for tag, fmt in (("train/score", "score {:.3f}"), ("train/kl", "kl {:.3f}"),
                   ("eval_train/reward", "eval (train prompts) reward {:.3f}"),
                   ("eval/reward", "eval reward {:.3f}"),
                   ("eval/answer_accuracy", "eval acc {:.3f}"), ("eval/kl", "eval kl {:.3f}"),
                   ("eval/sampled_reward", "eval sampled reward {:.3f}"),
                   ("eval/sampled_kl", "eval sampled kl {:.3f}"),
                   ("perf/iteration_s", "{:.1f} s/iter")):
    if tag in record:
      parts.append(fmt.format(record[tag]))
  return " | ".join(parts)


def train_rl(config: ml_collections.ConfigDict, workdir: str, *,
             stop_after: int | None = None, trainer: RLTrainer | None = None
             ) -> dict[str, float]:
  """Trains the RL stage `config` in `workdir` (resuming if it holds a checkpoint).

  `stop_after` ends this process after that iteration with a checkpoint, as a preemption
  would; rerunning resumes and finishes the same run. `trainer`: an RLTrainer of this very
  config to reuse (its jitted functions are compiled already; tests run several workdirs).
  Returns the last figures.
  """
  # --- Start-up: the workdir's lock and config check, before anything in it is touched -----
  maybe_initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open_run(config, workdir, "decoder"):
    return _train_rl_locked(config, workdir, stop_after, trainer)


def _train_rl_locked(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None,
                     trainer: RLTrainer | None) -> dict[str, float]:
  """`train_rl` once the run holds its workdir."""
  # --- Prompts ----------------------------------------------------------------------------
  # The run's folder keeps its tokenizer, for later stages started from it.
  tokenizer = resolve_tokenizer(config.data, workdir)
  if trainer is None:
    train_items = load_prompts(config, tokenizer, "train", workdir)
    eval_items = (load_prompts(config, tokenizer, "eval", workdir, distinct=True,
                               limit=config.eval.num_prompts)
                  if config.train.eval_every else None)
    logging.info("%d train prompts, %d held-out prompts", len(train_items),
                 len(eval_items or []))

    # --- Models ---------------------------------------------------------------------------
    trainer = RLTrainer(config, tokenizer=tokenizer, train_items=train_items,
                        eval_items=eval_items)

  # --- State: resumed, or fresh from init_from --------------------------------------------
  checkpointer = open_checkpointer(config, workdir)
  stale = trainer.rollouts
  in_flight = None
  if checkpointer.latest_step() is not None:
    abstract_rl = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                              sharding=a.sharding),
                               _rl_state(0, 0.0, trainer.mesh))
    abstract = {**trainer.setup.abstract_state, "rl": abstract_rl}
    if stale is not None and stale.in_flight_count(checkpointer.latest_step()):
      # The weights that sample the rollouts in flight (training/rl/offpolicy.py).
      abstract["in_flight"] = stale.abstract_in_flight(checkpointer.latest_step())
    restored, _ = checkpointer.restore(None, abstract)
    in_flight = restored.pop("in_flight", None)
    rl_state = restored.pop("rl")
    state, iteration = restored, int(rl_state["iteration"])
    kl_coef = float(rl_state["kl_coef"])
    logging.info("resumed from iteration %d", iteration)
  else:
    state, iteration, kl_coef = trainer.fresh_state(), 0, initial_kl_coef(config)
  if stale is not None:  # regenerated from their weights, not saved (offpolicy.py)
    stale.reset(iteration, in_flight)
  writer = open_writer(config, workdir, iteration, "decoder")

  # --- Loop (training/outer_loop.py) --------------------------------------------------------
  def step_fn(carry, iteration):
    state, kl_coef = carry
    state, record, kl_coef = trainer.iteration(state, iteration, kl_coef)
    figures = {k.removeprefix("train/"): v for k, v in record.items() if k.startswith("train/")}
    perf = {k.removeprefix("perf/"): v for k, v in record.items() if k.startswith("perf/")}
    return (state, kl_coef), StepResult(figures=figures, perf=perf)

  def save(iteration, carry, force):
    state, kl_coef = carry
    tree = {**state, "rl": _rl_state(iteration, kl_coef, trainer.mesh)}
    if stale is not None and stale.in_flight_count(iteration):
      tree["in_flight"] = stale.in_flight_params(iteration)
    checkpointer.save(iteration, tree, force=force)

  evaluate = None
  if trainer.evaluator is not None:
    evaluate = lambda carry: trainer.evaluator(carry[0]["params"])
  loop = OuterLoop(config, checkpointer, writer,
                   progress=lambda step, total, record, last: format_rl_progress(step, total,
                                                                                 record))
  # The initial (SFT) policy is evaluated before the first iteration: the "before".
  return loop.run((state, kl_coef), iteration, step_fn, save, evaluate, stop_after=stop_after,
                  evaluate_at_start=True)

"""`train_and_evaluate(config, workdir)`: the supervised loop every packed-data stage runs.

Sections: distributed start-up; the run's setup (training/setup.py: mesh, model, optimizer,
abstract state, frozen models, steps); data; state (fresh, resumed from `workdir`, or params
from `config.init_from`); evaluators; the outer loop (training/outer_loop.py: logging windows,
evaluation, checkpoints). Killing a run and rerunning the same command resumes it bit-exactly:
params, optimizer state, step, RNG and the data iterator are all restored.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from data.pipeline import resolve_tokenizer
from models.flops import train_flops_per_token
from parallel.distributed import maybe_initialize_distributed
from parallel.peak import total_peak_flops
from training.checkpoint import Checkpointer
from training.evaluation import SplitEvaluator, global_batch, stage_batches
from training.metrics import format_progress
from training.outer_loop import (OuterLoop, StepResult, open_checkpointer, open_run,
                                 open_writer)
from training.registry import get_stage
from training.setup import RunSetup, build_setup
from training.stage import EvalContext, Stage, batch_tokens
from training.step import LORA_BASE


def check_vocab(config: ml_collections.ConfigDict, tokenizer) -> None:
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but config.model.vocab_size "
                     f"is {config.model.vocab_size}")


def initial_state(setup: RunSetup, checkpointer: Checkpointer, train_iter) -> dict:
  """The state to start from: the latest checkpoint (with the data iterator's state), else
  fresh with the params of `config.init_from` where it has them."""
  config = setup.config
  if checkpointer.latest_step() is not None:
    # The newest step that restores (config.checkpoint.fallback), its state and every host's
    # saved shard states from that same step, merged: the shards may now be read by others.
    resumed = checkpointer.resume(setup.abstract_state)
    state = resumed.state
    if resumed.data_states is not None:
      try:
        train_iter.set_state(resumed.data_states)
      except ValueError as e:
        logging.warning("data iterator starts afresh: %s", e)
    logging.info("resumed from step %d", int(state["step"]))
    return state
  state = setup.fresh_state()
  if config.init_from:
    # Params the earlier run lacks (a reward head on a decoder) keep their fresh init. With
    # LoRA the adapters start fresh; only heads (a reward model's score) can be restored.
    keep = setup.spec.heads if setup.lora else tuple(state["params"])
    if keep:
      params = Checkpointer.restore_params(
          config.init_from, {k: setup.abstract_state["params"][k] for k in keep},
          fresh_params={k: state["params"][k] for k in keep})
      state = dict(state, params={**state["params"], **params})
    logging.info("params initialised from %s", config.init_from)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns last metrics.

  `stop_after` ends this process at that step with a checkpoint, as a preemption would, without
  changing the schedule: rerunning resumes and finishes the same run.
  """
  # --- Start-up: the workdir's lock and config check, before anything in it is touched -----
  maybe_initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  stage = get_stage(config.objective.name)
  with open_run(config, workdir, stage.model_kind):
    return _train_locked(config, workdir, stage, stop_after)


def _train_locked(config: ml_collections.ConfigDict, workdir: str, stage: Stage,
                  stop_after: int | None) -> dict[str, float]:
  """`train_and_evaluate` once the run holds its workdir."""
  # --- Setup ------------------------------------------------------------------------------
  setup = build_setup(config, stage)
  mesh, rules = setup.mesh, setup.rules
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

  # --- Data -------------------------------------------------------------------------------
  tokenizer = resolve_tokenizer(config.data, workdir)
  check_vocab(config, tokenizer)
  if stage.prepare is not None:  # one-off work before any data is read (e.g. DPO's reference)
    stage.prepare(config, tokenizer, mesh=mesh, rules=rules, workdir=workdir)
  batches = lambda split, epochs: stage_batches(stage.make_dataset, config, tokenizer,
                                                split=split, sharding=setup.data_sharding,
                                                workdir=workdir, num_epochs=epochs)
  train_iter = batches("train", None)
  logging.info("this host reads data shards %s of %d", train_iter.shards, train_iter.num_shards)

  # --- State, frozen models, steps --------------------------------------------------------
  checkpointer = open_checkpointer(config, workdir)
  state = initial_state(setup, checkpointer, train_iter)
  start = int(state["step"])
  writer = open_writer(config, workdir, start, stage.model_kind)
  frozen = setup.load_frozen()
  train_step = setup.train_step(frozen)
  global_size = config.data.global_batch_size

  # --- Evaluators -------------------------------------------------------------------------
  split_evaluator = SplitEvaluator(setup.eval_step(frozen), lambda: batches("eval", None),
                                   steps=config.train.eval_steps,
                                   sharding=setup.data_sharding, size=global_size)
  stage_evaluator, merge = None, None
  if stage.make_evaluator is not None and config.train.eval_every:
    # Stage evaluations (generation) see the model itself: a LoRA run's merged base.
    stage_evaluator = stage.make_evaluator(EvalContext(config, tokenizer, setup.base_spec,
                                                       mesh, rules, workdir))
    merge = jax.jit(setup.spec.merge) if setup.lora else None

  def evaluate(state) -> dict[str, float]:
    record = split_evaluator(state["params"], frozen.params)
    if stage_evaluator is not None:
      params = state["params"]
      if merge is not None:
        params = merge(frozen.params[LORA_BASE], params)
      record.update(stage_evaluator(params))
    return record

  # --- Loop -------------------------------------------------------------------------------
  def step_fn(state, step):
    del step
    local = next(train_iter)
    state, metrics = train_step(state, global_batch(local, setup.data_sharding, global_size),
                                frozen.params)
    return state, StepResult(metrics=metrics, tokens=batch_tokens(local) * global_size
                             // len(local["inputs"]))

  def save(step, state, force):
    checkpointer.save(step, state, train_iter.get_state(), force=force)

  loop = OuterLoop(config, checkpointer, writer,
                   progress=lambda step, total, record, last: format_progress(step, total, last),
                   flops_per_token=train_flops_per_token(config.model, config.data.seq_len),
                   peak_flops=total_peak_flops(config.model.dtype))
  return loop.run(state, start, step_fn, save, evaluate, stop_after=stop_after)

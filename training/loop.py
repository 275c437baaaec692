"""`train_and_evaluate(config, workdir)`: the one training loop every stage runs through.

Sections: distributed start-up and mesh; data; model, optimizer and sharded state (fresh,
resumed from `workdir`, or params from `config.init_from`); jitted steps; the loop with
logging, evaluation and checkpoints. Killing a run and rerunning the same command resumes it
bit-exactly: params, optimizer state, step, RNG and the data iterator are all restored.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

import models  # noqa: F401  (sets flax's variable-sharding mode before any module is built)
from data.pipeline import resolve_tokenizer
from models.build import build_model_spec
from models.flops import train_flops_per_token
from objectives.reductions import add_metrics, finalize_metrics
from parallel.distributed import maybe_initialize_distributed
from parallel.mesh import make_mesh
from parallel.rules import batch_sharding, get_rules, tree_shardings
from training.checkpoint import Checkpointer
from training.metrics import MetricsWriter, format_progress
from training.optimizer import make_optimizer
from training.peak import total_peak_flops
from training.stages import batch_tokens, get_stage
from training.state import abstract_train_state, init_train_state, shardings_of
from training.step import make_eval_step, make_train_step


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding
                 ) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's rows (each host passes only its shard)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def evaluate(eval_step, params, make_iter, steps: int, sharding, frozen_params=None
             ) -> dict[str, float]:
  """Mean eval metrics over the first `steps` batches of a fresh eval iterator."""
  total = None
  iterator = make_iter()
  for _ in range(steps):
    try:
      local = next(iterator)
    except StopIteration:
      break
    metrics = eval_step(params, global_batch(local, sharding), frozen_params)
    total = metrics if total is None else add_metrics(total, metrics)
  if total is None:
    return {}
  return {f"eval/{k}": float(v) for k, v in finalize_metrics(total).items()}


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What a stage's own held-out evaluation (e.g. greedy generation) gets to work with."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  spec: Any
  params: Any
  mesh: jax.sharding.Mesh
  rules: Any
  workdir: str


def load_frozen_models(stage, config, mesh, rules):
  """Specs, params and shardings of the stage's frozen models, restored sharded by path."""
  specs, params, shardings = {}, {}, {}
  for name, frozen in stage.frozen_models(config).items():
    spec = build_model_spec(frozen.model_config, frozen.kind)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          spec.shapes, tree_shardings(spec.logical_axes, spec.shapes, mesh, rules))
    specs[name] = spec
    params[name] = Checkpointer.restore_params(frozen.path, target)
    shardings[name] = jax.tree.map(lambda a: a.sharding, target)
    logging.info("frozen %s model loaded from %s", name, frozen.path)
  return specs, params, shardings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns last metrics.

  `stop_after` ends this process at that step with a checkpoint, as a preemption would, without
  changing the schedule: rerunning resumes and finishes the same run.
  """
  # --- Start-up and mesh ------------------------------------------------------------------
  maybe_initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config.mesh)
  rules = get_rules(config.mesh.rules)
  is_primary = jax.process_index() == 0
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

  # --- Data -------------------------------------------------------------------------------
  tokenizer = resolve_tokenizer(config.data, workdir)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but config.model.vocab_size "
                     f"is {config.model.vocab_size}")
  num_hosts, host = jax.process_count(), jax.process_index()
  if config.data.global_batch_size % num_hosts:
    raise ValueError(f"config.data.global_batch_size {config.data.global_batch_size} does not "
                     f"divide over {num_hosts} hosts")
  host_batch = config.data.global_batch_size // num_hosts
  stage = get_stage(config.objective.name)
  make_iter = lambda split, epochs: iter(stage.make_dataset(
      config, tokenizer, split=split, batch_size=host_batch, shard_index=host,
      shard_count=num_hosts, seed=config.seed, num_epochs=epochs, workdir=workdir))
  train_iter: Iterator[Any] = make_iter("train", None)
  data_sharding = batch_sharding(mesh, rules)

  # --- Model, optimizer, state ------------------------------------------------------------
  spec = build_model_spec(config.model, stage.model_kind)
  total_steps = config.train.steps
  optimizer, schedule = make_optimizer(config.optimizer, total_steps)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              max_to_keep=config.checkpoint.max_to_keep,
                              save_every=config.checkpoint.every_steps,
                              async_save=config.checkpoint.async_save)
  abstract_state = abstract_train_state(spec, optimizer, mesh, rules)
  shardings = shardings_of(abstract_state)
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(None, abstract_state)
    if data_state is not None:
      train_iter.set_state(data_state)
    logging.info("resumed from step %d", int(state["step"]))
  else:
    state = init_train_state(spec, optimizer, abstract_state, config.seed)
    if config.init_from:
      params = checkpointer.restore_params(config.init_from, abstract_state["params"])
      state = dict(state, params=params)
      logging.info("params initialised from %s", config.init_from)

  start_step = int(state["step"])
  # On resume, TensorBoard hides what a killed attempt logged after the checkpoint.
  writer = MetricsWriter(workdir, enabled=is_primary, purge_step=start_step + 1 if start_step
                         else None)
  writer.write_hparams(config.to_dict())

  frozen_specs, frozen_params, frozen_shardings = load_frozen_models(stage, config, mesh, rules)

  # --- Steps ------------------------------------------------------------------------------
  frozen_kwargs = dict(frozen_specs=frozen_specs, frozen_shardings=frozen_shardings)
  train_step = make_train_step(spec, stage.loss_fn, optimizer, schedule, config.objective,
                               mesh=mesh, rules=rules, shardings=shardings,
                               grad_accum_steps=config.train.grad_accum_steps, **frozen_kwargs)
  eval_step = make_eval_step(spec, stage.loss_fn, config.objective, mesh=mesh, rules=rules,
                             params_shardings=shardings["params"], **frozen_kwargs)
  flops_per_token = train_flops_per_token(config.model, config.data.seq_len)
  peak = total_peak_flops(config.model.dtype)

  # --- Loop -------------------------------------------------------------------------------
  step = int(state["step"])
  window, window_tokens, window_start, last = None, 0, None, {}
  end = total_steps if stop_after is None else min(stop_after, total_steps)
  while step < end:
    local = next(train_iter)
    state, metrics = train_step(state, global_batch(local, data_sharding), frozen_params)
    step += 1
    if window_start is None:
      # The first step of a process compiles; time from its end.
      jax.block_until_ready(state["step"])
      window_start = time.perf_counter()
    else:
      window_tokens += batch_tokens(local) * num_hosts
    window = metrics if window is None else add_metrics(window, metrics)
    checkpointer.save(step, state, train_iter.get_state())
    record = {}
    if step % config.train.log_every == 0 or step == total_steps:
      record = {f"train/{k}": float(v) for k, v in finalize_metrics(window).items()}
      elapsed = time.perf_counter() - window_start
      if window_tokens and elapsed > 0:
        record["perf/tokens_per_sec"] = window_tokens / elapsed
        record["perf/mfu"] = record["perf/tokens_per_sec"] * flops_per_token / peak
      window, window_tokens, window_start = None, 0, time.perf_counter()
    if config.train.eval_every and (step % config.train.eval_every == 0 or step == total_steps):
      record.update(evaluate(eval_step, state["params"], lambda: make_iter("eval", None),
                             config.train.eval_steps, data_sharding, frozen_params))
      if stage.evaluate is not None:
        record.update(stage.evaluate(EvalContext(config, tokenizer, spec, state["params"], mesh,
                                                 rules, workdir)))
      if window_start is not None:
        window_start = time.perf_counter()  # evaluation time is not training throughput
    if record:
      writer.write(step, record)
      last.update(record)
      if is_primary and "train/loss" in record:
        logging.info("%s", format_progress(step, total_steps, last))
  checkpointer.save(step, state, train_iter.get_state(), force=True)
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  return last


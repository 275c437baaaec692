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
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import models  # noqa: F401  (sets flax's variable-sharding mode before any module is built)
from data.pipeline import resolve_tokenizer
from configs.base import run_dir
from models.build import build_model_spec
from models.flops import train_flops_per_token
from models.lora import is_enabled as lora_enabled, make_lora_spec
from objectives.reductions import add_metrics, finalize_metrics
from parallel.distributed import maybe_initialize_distributed
from parallel.host_data import ShardedBatches
from parallel.mesh import make_mesh
from parallel.rules import batch_sharding, get_rules, tree_shardings
from training.checkpoint import Checkpointer
from training.metrics import MetricsWriter, format_progress
from training.optimizer import make_optimizer
from training.peak import total_peak_flops
from training.stages import batch_tokens, get_stage
from training.state import (abstract_train_state, init_train_state, load_lora_base,
                            shardings_of)
from training.step import LORA_BASE, make_eval_step, make_train_step


def global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                 size: int) -> dict[str, jax.Array]:
  """Assembles the `size`-row global batch from this host's rows (each host passes only the
  rows its devices hold)."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (size,) + v.shape[1:])
          for k, v in local.items()}


def evaluate(eval_step, params, make_iter, steps: int, sharding, size: int,
             frozen_params=None) -> dict[str, float]:
  """Mean eval metrics over the first `steps` batches of a fresh eval iterator."""
  total = None
  iterator = make_iter()
  for _ in range(steps):
    try:
      local = next(iterator)
    except StopIteration:
      break
    metrics = eval_step(params, global_batch(local, sharding, size), frozen_params)
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


def load_frozen_models(stage, config, mesh, rules, lora_base=None):
  """Specs, params and shardings of the stage's frozen models, restored sharded by path.

  `lora_base` (params, shardings) of a LoRA run's frozen base goes in under `LORA_BASE`, and a
  frozen model that is the same checkpoint and model (the DPO / PPO reference) shares it.
  """
  specs, params, shardings = {}, {}, {}
  if lora_base is not None:
    params[LORA_BASE], shardings[LORA_BASE] = lora_base
  for name, frozen in stage.frozen_models(config).items():
    spec = build_model_spec(frozen.model_config, frozen.kind)
    if lora_base is not None and is_lora_base(frozen, config, spec, lora_base[0]):
      specs[name], params[name], shardings[name] = spec, *lora_base
      logging.info("frozen %s model shares the LoRA base's params", name)
      continue
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          spec.shapes, tree_shardings(spec.logical_axes, spec.shapes, mesh, rules))
    specs[name] = spec
    params[name] = Checkpointer.restore_params(frozen.path, target)
    shardings[name] = jax.tree.map(lambda a: a.sharding, target)
    logging.info("frozen %s model loaded from %s", name, frozen.path)
  return specs, params, shardings


def is_lora_base(frozen, config, spec, base_params) -> bool:
  """Whether a frozen model is the LoRA run's base: the same checkpoint and param shapes."""
  same_path = os.path.abspath(run_dir(frozen.path)) == os.path.abspath(run_dir(config.init_from))
  return same_path and jax.tree.structure(spec.shapes) == jax.tree.structure(base_params) and all(
      a.shape == b.shape for a, b in zip(jax.tree.leaves(spec.shapes),
                                         jax.tree.leaves(base_params)))


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
  data_sharding = batch_sharding(mesh, rules)
  global_size = config.data.global_batch_size
  # Each host reads the data shards behind its rows of the batch (parallel/host_data.py). A
  # fixed config.data.num_shards makes the batches the same on any number of hosts and any
  # mesh; 0 (the default) gives one shard per host's block of rows.
  stage = get_stage(config.objective.name)
  if stage.prepare is not None:  # one-off work before any data is read (e.g. DPO's reference)
    stage.prepare(config, tokenizer, mesh=mesh, rules=rules, workdir=workdir)
  make_iter = lambda split, epochs: ShardedBatches.for_sharding(
      lambda index, count, rows: iter(stage.make_dataset(
          config, tokenizer, split=split, batch_size=rows, shard_index=index, shard_count=count,
          seed=config.seed, num_epochs=epochs, workdir=workdir)),
      data_sharding, global_size, config.data.get("num_shards", 0))
  train_iter = make_iter("train", None)
  logging.info("this host reads data shards %s of %d", train_iter.shards, train_iter.num_shards)

  # --- Model, optimizer, state ------------------------------------------------------------
  spec = base_spec = build_model_spec(config.model, stage.model_kind)
  use_lora = lora_enabled(config)
  if use_lora:  # the state trains adapters (and heads); the base stays frozen
    spec = make_lora_spec(base_spec, config.lora)
  total_steps = config.train.steps
  optimizer, schedule = make_optimizer(config.optimizer, total_steps)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              max_to_keep=config.checkpoint.max_to_keep,
                              save_every=config.checkpoint.every_steps,
                              async_save=config.checkpoint.async_save)
  abstract_state = abstract_train_state(spec, optimizer, mesh, rules)
  shardings = shardings_of(abstract_state)
  if checkpointer.latest_step() is not None:
    state, _ = checkpointer.restore(None, abstract_state)
    # Every host's saved shard states, merged: the shards may now be read by other hosts.
    data_states = checkpointer.restore_data_states(checkpointer.latest_step())
    try:
      train_iter.set_state(data_states)
    except ValueError as e:
      logging.warning("data iterator starts afresh: %s", e)
    logging.info("resumed from step %d", int(state["step"]))
  else:
    state = init_train_state(spec, optimizer, abstract_state, config.seed)
    if config.init_from:
      # Params the earlier run lacks (a reward head on a decoder) keep their fresh init. With
      # LoRA the adapters start fresh; only heads (a reward model's score) can be restored.
      keep = spec.heads if use_lora else tuple(state["params"])
      if keep:
        params = checkpointer.restore_params(
            config.init_from, {k: abstract_state["params"][k] for k in keep},
            fresh_params={k: state["params"][k] for k in keep})
        state = dict(state, params={**state["params"], **params})
      logging.info("params initialised from %s", config.init_from)

  start_step = int(state["step"])
  # On resume, TensorBoard hides what a killed attempt logged after the checkpoint.
  writer = MetricsWriter(workdir, enabled=is_primary, purge_step=start_step + 1 if start_step
                         else None)
  writer.write_hparams(config.to_dict())

  lora_base = load_lora_base(spec, config.init_from, mesh, rules) if use_lora else None
  frozen_specs, frozen_params, frozen_shardings = load_frozen_models(stage, config, mesh, rules,
                                                                     lora_base)

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
    state, metrics = train_step(state, global_batch(local, data_sharding, global_size),
                                frozen_params)
    step += 1
    if window_start is None:
      # The first step of a process compiles; time from its end.
      jax.block_until_ready(state["step"])
      window_start = time.perf_counter()
    else:
      window_tokens += batch_tokens(local) * global_size // len(local["inputs"])
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
                             config.train.eval_steps, data_sharding, global_size,
                             frozen_params))
      if stage.evaluate is not None:
        eval_spec, eval_params = spec, state["params"]
        if use_lora:  # stage evaluations (generation) see the merged model
          eval_spec, eval_params = base_spec, jax.jit(spec.merge)(lora_base[0], eval_params)
        record.update(stage.evaluate(EvalContext(config, tokenizer, eval_spec, eval_params,
                                                 mesh, rules, workdir)))
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


"""Causal-LM pretraining and continued pretraining: packed text, next-token cross-entropy.

Continued pretraining (configs/cpt.py) is this stage with a second corpus: with
`config.data.replay_weight > 0` the training stream mixes in that share of the replay corpus
(data/mixture.py), and the `evaluate` hook reports, beyond the loop's own `eval/*` on the main
corpus:

    eval_replay/*                   held-out metrics on the replay corpus, at every evaluation
                                    (when `config.data.replay_source` is set): forgetting;
    eval_init/*, eval_replay_init/* the same two evaluations of the `config.init_from` params,
                                    once per run (per process): the "before" of the run.

A hook rather than a second eval split in the loop: only CLM stages have a replay corpus, and
the "before" numbers need the init checkpoint, which only the stage knows to read again.
"""

from __future__ import annotations

import jax
import ml_collections

from data.mixture import make_mixed_clm_dataset, replay_data_config
from data.pipeline import make_clm_dataset
from objectives.clm import clm_loss
from training.stages import Stage


def clm_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """Causal LM on a packed batch {inputs, targets, loss_mask, segment_ids, positions}."""
  del rng, frozen
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return clm_loss(logits, batch["targets"], batch["loss_mask"], z_loss=cfg.z_loss)


def make_dataset(config, tokenizer, **kwargs):
  if kwargs.get("split") == "train" and config.data.get("replay_weight", 0.0) > 0:
    return make_mixed_clm_dataset(config.data, tokenizer, seq_len=config.data.seq_len,
                                  **kwargs)
  return make_clm_dataset(config.data, tokenizer, seq_len=config.data.seq_len, **kwargs)


# One jitted eval step, kept while the same spec and mesh are in use (one run), and the runs
# whose init params were already evaluated in this process.
_EVAL_STEP: dict = {}
_INIT_EVALUATED: set = set()


def _eval_step(ctx):
  from training.step import make_eval_step
  key = (id(ctx.spec), id(ctx.mesh))
  if _EVAL_STEP.get("key") != key:
    shardings = jax.tree.map(lambda a: a.sharding, ctx.params)
    _EVAL_STEP.update(key=key, keep=(ctx.spec, ctx.mesh), fn=make_eval_step(
        ctx.spec, clm_forward, ctx.config.objective, mesh=ctx.mesh, rules=ctx.rules,
        params_shardings=shardings))
  return _EVAL_STEP["fn"]


def _evaluate_corpus(ctx, params, data_config, prefix: str) -> dict:
  """The loop's held-out evaluation of `params` on `data_config`'s eval split, as prefix/*.

  Batches are read as the loop reads its own eval split: each host the data shards behind
  its rows of the global batch (parallel/host_data.py).
  """
  from parallel.host_data import ShardedBatches
  from parallel.rules import batch_sharding
  from training.loop import evaluate
  config = ctx.config
  sharding, size = batch_sharding(ctx.mesh, ctx.rules), config.data.global_batch_size
  make_iter = lambda: ShardedBatches.for_sharding(
      lambda index, count, rows: iter(make_clm_dataset(
          data_config, ctx.tokenizer, split="eval", seq_len=config.data.seq_len,
          batch_size=rows, shard_index=index, shard_count=count, seed=config.seed,
          workdir=ctx.workdir)),
      sharding, size, config.data.get("num_shards", 0))
  metrics = evaluate(_eval_step(ctx), params, make_iter, config.train.eval_steps, sharding,
                     size)
  return {f"{prefix}/{k.removeprefix('eval/')}": v for k, v in metrics.items()}


def evaluate_extra(ctx) -> dict:
  """`Stage.evaluate`: replay-corpus and init-params metrics (see the module docstring)."""
  config = ctx.config
  replay = replay_data_config(config.data)
  record = {}
  if replay is not None:
    record.update(_evaluate_corpus(ctx, ctx.params, replay, "eval_replay"))
  run = (ctx.workdir, config.init_from)
  if config.init_from and run not in _INIT_EVALUATED:
    from training.checkpoint import Checkpointer
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          ctx.params)
    init_params = Checkpointer.restore_params(config.init_from, target)
    record.update(_evaluate_corpus(ctx, init_params, config.data, "eval_init"))
    if replay is not None:
      record.update(_evaluate_corpus(ctx, init_params, replay, "eval_replay_init"))
    _INIT_EVALUATED.add(run)
  return record


STAGE = Stage(name="clm", loss_fn=clm_forward, make_dataset=make_dataset,
              evaluate=evaluate_extra)

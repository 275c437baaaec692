"""Causal-LM pretraining and continued pretraining: packed text, next-token cross-entropy.

Continued pretraining (configs/cpt.py) is this stage with a second corpus: with
`config.data.replay_weight > 0` the training stream mixes in that share of the replay corpus
(data/mixture.py), and its evaluator (`ClmEvaluator`) reports, beyond the loop's own `eval/*`
on the main corpus:

    eval_replay/*                   held-out metrics on the replay corpus, at every evaluation
                                    (when `config.data.replay_source` is set): forgetting;
    eval_init/*, eval_replay_init/* the same two evaluations of the `config.init_from` params,
                                    once per run (per process): the "before" of the run.

An evaluator rather than a second eval split in the loop: only CLM stages have a replay corpus,
and the "before" numbers need the init checkpoint, which only the stage knows to read again.
"""

from __future__ import annotations

import jax
import ml_collections

from data.mixture import make_mixed_clm_dataset, replay_data_config
from data.pipeline import make_clm_dataset
from models.moe import pop_aux
from objectives.clm import clm_loss
from objectives.router import add_router_losses
from parallel.rules import batch_sharding
from training.evaluation import SplitEvaluator, stage_batches
from training.runs import load_params
from training.batch_shapes import packed_rows
from training.stage import EvalContext, Stage
from training.step import make_eval_step


def clm_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """Causal LM on a packed batch {inputs, targets, loss_mask, segment_ids, positions}."""
  del rng, frozen
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  per_token, metrics = clm_loss(logits, batch["targets"], batch["loss_mask"], z_loss=cfg.z_loss)
  aux = pop_aux(model)       # {} unless the model has MoE layers (models/moe.py)
  if aux:
    model_cfg = model.config
    metrics = add_router_losses(metrics, aux, aux_coef=model_cfg.get("moe_aux_coef", 0.0),
                                z_coef=model_cfg.get("moe_z_coef", 0.0))
  return per_token, metrics


def make_dataset(config, tokenizer, **kwargs):
  if kwargs.get("split") == "train" and config.data.get("replay_weight", 0.0) > 0:
    return make_mixed_clm_dataset(config.data, tokenizer, seq_len=config.data.seq_len,
                                  **kwargs)
  return make_clm_dataset(config.data, tokenizer, seq_len=config.data.seq_len, **kwargs)


class ClmEvaluator:
  """`Stage.make_evaluator`: replay-corpus and init-params metrics (see the module docstring).

  Built once per run: it owns the jitted eval step (compiled on the first call, for the
  params' shardings) and remembers that the init params were evaluated.
  """

  def __init__(self, ctx: EvalContext):
    self.ctx = ctx
    self.replay = replay_data_config(ctx.config.data)
    self.init_evaluated = False
    self._eval_step = None

  def _corpus(self, data_config, prefix: str, params) -> dict[str, float]:
    """The loop's held-out evaluation of `params` on `data_config`'s eval split, as prefix/*."""
    ctx, config = self.ctx, self.ctx.config
    if self._eval_step is None:
      self._eval_step = make_eval_step(
          ctx.spec, clm_forward, config.objective, mesh=ctx.mesh, rules=ctx.rules,
          params_shardings=jax.tree.map(lambda a: a.sharding, params))
    corpus = lambda cfg, tokenizer, **kwargs: make_clm_dataset(
        data_config, tokenizer, seq_len=cfg.data.seq_len, **kwargs)
    sharding = batch_sharding(ctx.mesh, ctx.rules)
    evaluator = SplitEvaluator(
        self._eval_step, lambda: stage_batches(corpus, config, ctx.tokenizer, split="eval",
                                               sharding=sharding, workdir=ctx.workdir),
        steps=config.train.eval_steps, sharding=sharding,
        size=config.data.global_batch_size, prefix=prefix)
    return evaluator(params)

  def __call__(self, params) -> dict[str, float]:
    config = self.ctx.config
    record = {}
    if self.replay is not None:
      record.update(self._corpus(self.replay, "eval_replay", params))
    if config.init_from and not self.init_evaluated:
      ctx = self.ctx
      init_params = load_params(config.init_from, ctx.spec, ctx.mesh, ctx.rules)
      record.update(self._corpus(config.data, "eval_init", init_params))
      if self.replay is not None:
        record.update(self._corpus(self.replay, "eval_replay_init", init_params))
      self.init_evaluated = True
    return record


def abstract_batch(config) -> dict:
  """`Stage.abstract_batch`: packed text rows (data/pipeline.py, data/mixture.py)."""
  return packed_rows(config)


STAGE = Stage(name="clm", loss_fn=clm_forward, make_dataset=make_dataset,
              make_evaluator=ClmEvaluator, abstract_batch=abstract_batch)

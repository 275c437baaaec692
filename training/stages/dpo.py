"""DPO family and KTO: a decoder policy trained on preferences against a frozen reference.

config.objective:
  loss_type        sigmoid | hinge | ipo | robust | simpo | orpo (objectives/dpo.py) on
                   preference pairs; kto (objectives/kto.py) on unpaired feedback records
  beta, label_smoothing, simpo_gamma, orpo_lambda, kto_desirable_weight,
  kto_undesirable_weight   the losses' hyperparameters
  reference        run or checkpoint of the reference pi_ref ('' = config.init_from)
  reference_mode   'cached': log pi_ref of every example computed once before training and
                   read from the batch (training/stages/reference_cache.py); 'in_step': the
                   frozen reference runs in every step (no preparation; costs a forward pass
                   per step and the reference's memory)

One forward pass of the policy per step covers both sequences of every example: a pair (or a
KTO example with its mismatched completion) is one packing unit of two segments
(data/preferences.py), and per-example sums come from segment sums (objectives/pairs.py).
SimPO and ORPO need no reference.

Held-out evaluation: besides the loss metrics on the eval split (`eval/rewards/accuracies`
...), its evaluator (`PairsEvaluator`) scores the DPO implicit reward beta log(pi / pi_ref) on every held-out
preference pair, whatever the loss: `eval/pairs/accuracy` (ties count 1/2, so 0.5 at
pi = pi_ref) and `eval/pairs/logratio_margin` (mean of h, the chosen minus the rejected
log-ratio, without beta). For KTO, trained on unpaired data, and SimPO / ORPO, whose own rewards
differ, this is the comparable figure. It needs a reference (or init_from).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from data.preferences import EncodeExample, load_examples, make_preference_dataset
from objectives.dpo import REFERENCE_FREE, Hyper, PairLogps, dpo_loss, preference_accuracy
from objectives.kto import kl_reference_point, kto_loss
from objectives.pairs import pair_mask, segment_last, split_pairs
from models.build import build_model_spec
from training.batch_shapes import packed_rows
from training.runs import load_params
from training.stage import EvalContext, FrozenModel, Stage
from training.stages.reference_cache import (ReferenceCache, make_pair_log_probs_fn,
                                             pair_log_probs, params_checksum, split_table,
                                             units_fingerprint)

REFERENCE_MODES = ("cached", "in_step")


def record_kind(objective: ml_collections.ConfigDict) -> str:
  return "feedback" if objective.loss_type == "kto" else "preferences"


def needs_reference(objective: ml_collections.ConfigDict) -> bool:
  return objective.loss_type not in REFERENCE_FREE


def reference_path(config: ml_collections.ConfigDict, *, required: bool) -> str:
  path = config.objective.reference or config.init_from
  if required and not path:
    raise ValueError(f"loss_type {config.objective.loss_type!r} needs a reference model: set "
                     "config.objective.reference or config.init_from")
  return path


def _cached(objective: ml_collections.ConfigDict) -> bool:
  if objective.reference_mode not in REFERENCE_MODES:
    raise ValueError(f"config.objective.reference_mode: unknown {objective.reference_mode!r} "
                     f"({' | '.join(REFERENCE_MODES)})")
  return needs_reference(objective) and objective.reference_mode == "cached"


def _reference_logps(batch, cfg, frozen) -> tuple:
  """(first, second) `[batch, P]` reference log-probs: cached in the batch or computed now."""
  if not needs_reference(cfg):
    return None, None
  if "reference" in frozen:
    seqs = pair_log_probs(frozen["reference"], batch)
    return seqs.first, seqs.second
  return split_pairs(segment_last(batch["reference_logps"], batch["segment_ids"]))


def dpo_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """One policy pass over a packed preference (or KTO) batch -> per-example loss, metrics."""
  del rng
  policy = pair_log_probs(model, batch)
  ref_first, ref_second = _reference_logps(batch, cfg, frozen)
  mask = pair_mask(batch["sides"], batch["segment_ids"])
  if cfg.loss_type == "kto":
    desirable, _ = split_pairs(segment_last(batch["desirable"], batch["segment_ids"]))
    kl = kl_reference_point(policy.second, ref_second, mask)
    return kto_loss(policy.first, ref_first, desirable > 0, mask, kl=kl, beta=cfg.beta,
                    desirable_weight=cfg.kto_desirable_weight,
                    undesirable_weight=cfg.kto_undesirable_weight)
  logps = PairLogps(policy.first, policy.second, ref_first, ref_second, policy.first_tokens,
                    policy.second_tokens)
  hyper = Hyper(beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                simpo_gamma=cfg.simpo_gamma, orpo_lambda=cfg.orpo_lambda)
  return dpo_loss(logps, mask, loss_type=cfg.loss_type, hyper=hyper)


def make_dataset(config, tokenizer, *, split, workdir=None, **kwargs):
  reference = ReferenceCache(workdir).load(split) if _cached(config.objective) else None
  return make_preference_dataset(config.data, tokenizer, kind=record_kind(config.objective),
                                 split=split, shift=True, workdir=workdir, reference=reference,
                                 **kwargs)


def frozen_models(config) -> dict[str, FrozenModel]:
  if needs_reference(config.objective) and not _cached(config.objective):
    return {"reference": FrozenModel(config.model, reference_path(config, required=True))}
  return {}


def _pairs_split(config) -> str | None:
  """The split holding held-out preference pairs ('eval', or 'pairs_eval' for KTO)."""
  if record_kind(config.objective) == "preferences":
    return "eval"
  data = config.data
  return "pairs_eval" if data.source == "tiny_world" or data.pairs_eval_files else None


def _split_data(config, tokenizer, split: str, workdir: str):
  """(encode, number of examples, fresh batch iterator) of a split, in file order."""
  kind = record_kind(config.objective)
  examples, _ = load_examples(config.data, kind, split, workdir)
  encode = EncodeExample(examples, tokenizer, template=config.data.chat_template,
                         seq_len=config.data.seq_len, shift=True)
  batches = lambda: iter(make_preference_dataset(
      config.data, tokenizer, kind=kind, split=split, shift=True, workdir=workdir,
      batch_size=config.data.global_batch_size, num_epochs=1, shuffle=False))
  return encode, len(examples), batches


def prepare(config, tokenizer, *, mesh, rules, workdir: str) -> None:
  """Caches reference log-probs of the train / eval examples (cached mode) and of the held-out
  pairs that `PairsEvaluator` scores; reuses tables whose fingerprint still matches."""
  splits = ["train", "eval"] if _cached(config.objective) else []
  path = reference_path(config, required=bool(splits))
  pairs = _pairs_split(config)
  if path and pairs and pairs not in splits:
    splits.append(pairs)
  if not path or not splits:
    return
  data = {split: _split_data(config, tokenizer, split, workdir) for split in splits}
  spec = build_model_spec(config.model, "decoder")
  params = load_params(path, spec, mesh, rules)
  checksum = params_checksum(params)
  cache, forward = ReferenceCache(workdir), None
  for split, (encode, num, batches) in data.items():
    digest = units_fingerprint(encode, num)
    digest.update(checksum.encode())
    fingerprint = digest.hexdigest()
    if cache.fingerprint(split) == fingerprint:
      continue
    forward = forward or make_pair_log_probs_fn(spec, mesh, rules)
    table = split_table(forward, params, batches(), num, mesh=mesh, rules=rules,
                        global_batch=config.data.global_batch_size)
    cache.save(split, table, fingerprint)


class PairsEvaluator:
  """`Stage.make_evaluator`: implicit-reward accuracy beta log(pi / pi_ref) on every held-out
  preference pair. Built once per run: it owns the jitted forward pass."""

  def __init__(self, ctx: EvalContext):
    self.ctx = ctx
    config = ctx.config
    self.split = _pairs_split(config)
    self.enabled = self.split is not None and bool(reference_path(config, required=False))
    self.forward = (make_pair_log_probs_fn(ctx.spec, ctx.mesh, ctx.rules) if self.enabled
                    else None)

  def __call__(self, params) -> dict[str, float]:
    if not self.enabled:
      return {}
    ctx, config = self.ctx, self.ctx.config
    reference = ReferenceCache(ctx.workdir).load(self.split)
    _, num, batches = _split_data(config, ctx.tokenizer, self.split, ctx.workdir)
    policy = split_table(self.forward, params, batches(), num, mesh=ctx.mesh, rules=ctx.rules,
                         global_batch=config.data.global_batch_size)
    # The accuracy does not depend on beta; the margin is reported without it, so runs with
    # different betas (SimPO's 2.0, DPO's 0.1) compare.
    ratio_w, ratio_l = policy[:, 0] - reference[:, 0], policy[:, 1] - reference[:, 1]
    return {"eval/pairs/accuracy": float(np.mean(preference_accuracy(ratio_w, ratio_l))),
            "eval/pairs/logratio_margin": float(np.mean(ratio_w - ratio_l))}


def abstract_batch(config) -> dict:
  """`Stage.abstract_batch`: packed pairs (or KTO examples) of data/preferences.py, with the
  cached reference log-probs in `cached` mode."""
  fields = dict(sides=jnp.int32, example_ids=jnp.int32)
  fields["desirable" if record_kind(config.objective) == "feedback" else "margins"] = jnp.float32
  if _cached(config.objective):
    fields["reference_logps"] = jnp.float32
  return packed_rows(config, **fields)


STAGE = Stage(name="dpo", loss_fn=dpo_forward, make_dataset=make_dataset,
              frozen_models=frozen_models, prepare=prepare, make_evaluator=PairsEvaluator,
              abstract_batch=abstract_batch)

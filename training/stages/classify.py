"""Task fine-tuning: a classification or regression head on a pretrained decoder or encoder.

    classify           SequenceClassifier (models/heads.py): the decoder body, `score` read at
                       each sequence's last token (as HF's *ForSequenceClassification)
    classify_encoder   EncoderClassifier: the encoder body, BERT's pooler + `classifier` read
                       at each sequence's first token ([CLS])

  loss_fn       one forward pass over packed examples (data/classify.py marks each one's pooled
                token in `loss_mask`) -> objectives/classify.py: label-smoothed, class-weighted
                cross-entropy, or squared error (`config.objective.problem_type` regression)
  make_dataset  records {text[, text_b], label} (data/sources.py kind 'labelled') -> packed
  evaluator     `TaskEvaluator`: predictions over the *whole* held-out split, gathered from
                every host, and the figures that are not means of per-batch values:
                  eval_task/accuracy, eval_task/macro_f1, eval_task/nll   (classification)
                  eval_task/mse, eval_task/pearson, eval_task/spearman    (regression)
                  eval_task/examples
                and, once per run when `config.eval.before`, the same of the model the run
                starts from (`init_from`'s body, the run's fresh head): eval_task_init/*
  `Predictor`   per-example outputs of any classifier run (scripts/classify.py uses it).

The loop's own `eval/*` are the objective's (sum, weight) means over `train.eval_steps`
batches: loss, nll, accuracy (or mse, mae).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import sources
from data.classify import LabelSpec, Labelled, batch_fields, make_classify_dataset
from objectives.classify import (confusion_matrix, cross_entropy_loss, macro_f1, pearson,
                                 spearman, squared_error_loss)
from parallel.host_data import to_host
from parallel.rules import batch_sharding, use_mesh_rules
from training.checkpoint import Checkpointer
from training.evaluation import global_batch, stage_batches
from training.runs import sharded_target
from training.stage import EvalContext, Stage
from training.state import init_train_state_fn

# Stage (config.objective.name) -> the body its model has (data/classify.py BODIES).
BODY_OF_STAGE = {"classify": "decoder", "classify_encoder": "encoder"}


def class_weights(cfg: ml_collections.ConfigDict, num_labels: int) -> jax.Array | None:
  """`config.objective.class_weights` ('' or comma-separated, one per label) as an array."""
  text = cfg.get("class_weights", "")
  if not text:
    return None
  weights = [float(w) for w in text.split(",")]
  if len(weights) != num_labels or min(weights) <= 0:
    raise ValueError(f"config.objective.class_weights needs {num_labels} weights > 0, got "
                     f"{text!r}")
  return jnp.asarray(weights, jnp.float32)


def call_model(model, batch) -> jax.Array:
  """Per-token outputs `[batch, length, num_labels]` of a classifier on a packed batch."""
  extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
  return model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
               **extra)


def classify_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """Loss of each example read at its pooled token (`loss_mask`) -> objectives/classify.py."""
  del rng, frozen
  outputs = call_model(model, batch)
  if cfg.problem_type == "regression":
    return squared_error_loss(outputs, batch["labels"], batch["loss_mask"])
  return cross_entropy_loss(outputs, batch["labels"], batch["loss_mask"],
                            label_smoothing=cfg.label_smoothing,
                            class_weights=class_weights(cfg, outputs.shape[-1]))


def label_spec(config: ml_collections.ConfigDict) -> LabelSpec:
  return LabelSpec.from_config(config.data, config.model.num_labels,
                               config.objective.problem_type)


def load_examples(config: ml_collections.ConfigDict, split: str,
                  workdir: str | None) -> Sequence[Labelled]:
  """The labelled examples of `split` ('train' | 'eval'), in file order."""
  return sources.load_records(config.data, "labelled", split, workdir,
                              labels=label_spec(config))


def make_dataset(config, tokenizer, *, body: str, split: str, workdir: str | None = None,
                 examples: Sequence[Labelled] | None = None, **kwargs):
  """Stage.make_dataset; `examples` replaces the split's records (an evaluator's own)."""
  if examples is None:
    examples = load_examples(config, split, workdir)
  return make_classify_dataset(config.data, tokenizer, examples, body=body,
                               regression=config.objective.problem_type == "regression",
                               split=split, **kwargs)


def abstract_batch(config: ml_collections.ConfigDict, *, body: str) -> dict[str, Any]:
  """Stage.abstract_batch: the `[global_batch, seq_len]` fields `make_dataset` yields."""
  shape = (config.data.global_batch_size, config.data.seq_len)
  regression = config.objective.problem_type == "regression"
  return {k: jax.ShapeDtypeStruct(shape, dtype)
          for k, dtype in batch_fields(body, regression).items()}


# --- Predictions and whole-set figures ------------------------------------------------------

class Predictor:
  """`predictor(params, batches) -> (example_ids [n], outputs [n, num_labels], labels [n])`
  over global batches, in batch order, one entry per example (its pooled token), gathered
  from every host. Owns its jitted forward pass (compiled once per batch shape)."""

  def __init__(self, spec, mesh: jax.sharding.Mesh, rules):
    def forward(params, batch):
      with use_mesh_rules(mesh, rules):
        return call_model(spec.bind(params), batch)
    self._forward = jax.jit(forward)

  def __call__(self, params, batches: Iterable[dict[str, jax.Array]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, outputs, labels = [], [], []
    for batch in batches:
      out = to_host(self._forward(params, batch))
      pooled = to_host(batch["loss_mask"]) > 0
      ids.append(to_host(batch["example_ids"])[pooled])
      outputs.append(out[pooled])
      labels.append(to_host(batch["labels"])[pooled])
    if not ids:
      return np.zeros(0, np.int32), np.zeros((0, 0), np.float32), np.zeros(0)
    return np.concatenate(ids), np.concatenate(outputs), np.concatenate(labels)


def task_metrics(outputs: np.ndarray, labels: np.ndarray, *, regression: bool,
                 prefix: str = "eval_task") -> dict[str, float]:
  """Whole-set figures of per-example `outputs` `[n, num_labels]` against `labels` `[n]`."""
  n = len(labels)
  metrics = {f"{prefix}/examples": float(n)}
  if n == 0:
    return metrics
  if regression:
    predictions = outputs[:, 0]
    metrics.update({f"{prefix}/mse": float(np.mean(np.square(predictions - labels))),
                    f"{prefix}/pearson": float(pearson(predictions, labels)),
                    f"{prefix}/spearman": float(spearman(predictions, labels))})
    return metrics
  labels = labels.astype(np.int32)
  predictions = outputs.argmax(-1)
  log_p = jax.nn.log_softmax(jnp.asarray(outputs, jnp.float32), axis=-1)
  nll = -np.asarray(log_p)[np.arange(n), labels]
  confusion = confusion_matrix(predictions, labels, np.ones(n), outputs.shape[-1])
  metrics.update({f"{prefix}/accuracy": float(np.mean(predictions == labels)),
                  f"{prefix}/macro_f1": float(macro_f1(confusion)),
                  f"{prefix}/nll": float(np.mean(nll))})
  return metrics


class TaskEvaluator:
  """`Stage.make_evaluator`: whole-set held-out figures (module docstring). Built once per
  run: reads the held-out examples once (the first `config.eval.max_examples`, 0: all) and
  keeps one `Predictor`."""

  def __init__(self, ctx: EvalContext):
    self.ctx = ctx
    config = ctx.config
    self.body = BODY_OF_STAGE[config.objective.name]
    self.regression = config.objective.problem_type == "regression"
    examples = load_examples(config, "eval", ctx.workdir or None)
    limit = config.eval.get("max_examples", 0)
    self.examples = tuple(examples[:limit] if limit else examples)
    self.predictor = Predictor(ctx.spec, ctx.mesh, ctx.rules)
    self.before = bool(config.init_from) and config.eval.get("before", False)

  def batches(self):
    config, ctx = self.ctx.config, self.ctx
    make = functools.partial(make_dataset, body=self.body, examples=self.examples)
    sharding = batch_sharding(ctx.mesh, ctx.rules)
    for local in stage_batches(make, config, ctx.tokenizer, split="eval", sharding=sharding,
                               workdir=ctx.workdir, num_epochs=1):
      yield global_batch(local, sharding, config.data.global_batch_size)

  def evaluate(self, params, prefix: str) -> dict[str, float]:
    _, outputs, labels = self.predictor(params, self.batches())
    return task_metrics(outputs, labels, regression=self.regression, prefix=prefix)

  def __call__(self, params) -> dict[str, float]:
    record = self.evaluate(params, "eval_task")
    if self.before:
      record.update(self.evaluate(initial_params(self.ctx), "eval_task_init"))
      self.before = False
    return record


def initial_params(ctx: EvalContext):
  """The params a run starts from: `init_from`'s where it has them, the others (the new
  head) as the run's own fresh init from `config.seed` (training/state.py), sharded."""
  spec = ctx.spec
  target = sharded_target(spec.shapes, spec.logical_axes, ctx.mesh, ctx.rules)
  init = init_train_state_fn(spec, optax.identity())
  fresh = jax.jit(lambda key: init(key)["params"],
                  out_shardings=jax.tree.map(lambda a: a.sharding, target))(
                      jax.random.PRNGKey(ctx.config.seed))
  return Checkpointer.restore_params(ctx.config.init_from, target, fresh_params=fresh)


def _stage(name: str, model_kind: str) -> Stage:
  body = BODY_OF_STAGE[name]
  return Stage(name=name, loss_fn=classify_forward,
               make_dataset=functools.partial(make_dataset, body=body), model_kind=model_kind,
               make_evaluator=TaskEvaluator,
               abstract_batch=functools.partial(abstract_batch, body=body))


STAGE = _stage("classify", "classifier")
ENCODER_STAGE = _stage("classify_encoder", "encoder_classifier")

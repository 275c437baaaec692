"""Knowledge distillation of a causal LM: a frozen teacher, a trained student, packed text.

The teacher is an earlier run (`config.objective.teacher`: its workdir, checkpoints dir or
step dir). Its architecture is read from that run's `config.json`, so it may be larger than
the student (other width, depth, heads); the vocabulary must be the same (same tokenizer: the
distill config takes the teacher run's tokenizer). Both models see the same packed batch; the
objective (objectives/distill.py) compares their next-token distributions on the loss mask.
"""

from __future__ import annotations

import ml_collections

from configs.run_layout import read_run_config
from objectives.distill import distill_loss
from training.stage import FrozenModel, Stage
from training.stages.clm import abstract_batch, make_dataset


def teacher_model_config(path: str) -> ml_collections.ConfigDict:
  """The `model` section of the run at `path` (its workdir, checkpoints dir or step dir),
  completed by today's model defaults like every run's config."""
  if not path:
    raise ValueError("config.objective.teacher is empty: set it to the teacher run's workdir")
  try:
    return read_run_config(path).model
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (config.objective.teacher must be a run trained by "
                            "scripts.train: its workdir holds config.json)") from None


def frozen_models(config: ml_collections.ConfigDict) -> dict[str, FrozenModel]:
  teacher = teacher_model_config(config.objective.teacher)
  if teacher.vocab_size != config.model.vocab_size:
    raise ValueError(f"teacher vocab_size {teacher.vocab_size} != student "
                     f"config.model.vocab_size {config.model.vocab_size}")
  return {"teacher": FrozenModel(teacher, config.objective.teacher, kind="decoder")}


def distill_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """Student and teacher on the same packed batch; the teacher's params are stop-gradient."""
  del rng
  kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  student_logits = model(batch["inputs"], **kwargs)
  teacher_logits = frozen["teacher"](batch["inputs"], **kwargs)
  return distill_loss(student_logits, teacher_logits, batch["targets"], batch["loss_mask"],
                      divergence=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature,
                      ce_weight=cfg.ce_weight)


STAGE = Stage(name="distill", loss_fn=distill_forward, make_dataset=make_dataset,
              frozen_models=frozen_models, abstract_batch=abstract_batch)

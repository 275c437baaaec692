"""Knowledge distillation: a small student LM learns from a frozen, larger teacher LM.

On the tiny world, the teacher is the pretraining tiny run; the student (d 64, 2 layers) is
trained by distillation, and the same student trained on the labels alone for the same steps
is the comparison:

  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny
  python -m scripts.train --config configs/distill.py:tiny --workdir runs/distill_tiny \\
      --config.objective.teacher=runs/pretrain_tiny
  python -m scripts.train --config configs/distill.py:tiny_student_only \\
      --workdir runs/student_tiny --config.objective.teacher=runs/pretrain_tiny

Compare `eval/nll` (held-out cross-entropy on the labels) of the two runs at equal steps.
The teacher's architecture comes from its run's config.json and the tokenizer from its run
directory (`{teacher}/tokenizer/spm.model`), so the vocabularies match. Objective fields:
`divergence` forward_kl | reverse_kl | jsd, `beta` (jsd), `temperature`, `ce_weight` (share of
label cross-entropy in the loss); see objectives/distill.py.
"""

import ml_collections

from configs import base
from configs.models import model_config


def _tiny_student() -> ml_collections.ConfigDict:
  model = model_config("tiny")
  model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192))
  return model


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "distill"
  config.objective = ml_collections.ConfigDict(dict(
      name="distill",
      teacher="",               # workdir (or checkpoint dir) of the teacher run
      divergence="forward_kl",  # forward_kl | reverse_kl | jsd
      beta=0.5,                 # jsd: weight of the teacher in the mixture
      temperature=1.0,
      ce_weight=0.0,            # 0: pure distillation; 1: labels only
  ))
  # The teacher run's tokenizer, following --config.objective.teacher (configs/base.py).
  config.data.tokenizer = base.tokenizer_of_run(config.objective.get_ref("teacher"))
  if arg in ("tiny", "tiny_student_only"):
    config.objective.teacher = "runs/pretrain_tiny"
    config.model = _tiny_student()
    config.data.source = "tiny_world"
    config.data.tokenizer_vocab_size = config.model.vocab_size
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.train.steps = 300
    config.train.eval_every = 100
    config.train.eval_steps = 8
    config.train.log_every = 20
    config.checkpoint.every_steps = 100
    config.optimizer.lr = 3e-3
    config.optimizer.warmup_steps = 30
    if arg == "tiny_student_only":
      # The comparison: the same student, data, steps and optimizer, labels only (CLM).
      # `teacher` stays (shared with data.tokenizer) only so both runs use its tokenizer.
      config.stage = "distill_baseline"
      config.objective = ml_collections.ConfigDict(dict(
          name="clm", z_loss=0.0, teacher=config.objective.get_ref("teacher")))
  elif arg == "1b_from_8b":
    config.model = model_config("1b")
    config.model.vocab_size = 128256  # the teacher's (Llama-3) vocabulary
    config.data.source = "files"
    config.data.seq_len = 2048
    config.data.global_batch_size = 256
    config.train.steps = 50_000
    config.train.eval_every = 1000
    config.checkpoint.every_steps = 1000
    config.optimizer.update(dict(lr=3e-4, warmup_steps=1000))
    config.mesh.fsdp = -1
    config.mesh.data = 1
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, tiny_student_only, 1b_from_8b")
  return config

"""Reward model: a decoder with a scalar head trained on preference pairs (Bradley-Terry).

On the tiny world, after pretraining and SFT (configs/pretrain.py, configs/sft.py):

  python -m scripts.train --config configs/reward.py:tiny --workdir runs/reward_tiny \\
      --config.init_from=runs/sft_tiny

The decoder's params come from `init_from` (its LM head is dropped, the `score` head starts
fresh: models/heads.py) and so does the tokenizer. metrics.jsonl reports, on held-out pairs,
`eval/accuracy` (chosen scored higher), `eval/margin`, `eval/chosen`, `eval/rejected`.

Data (`config.data`, shared with configs/dpo.py): source `tiny_world` (the tiny world's
preference pairs, data/tiny_tasks.py; `tiny_task` prompt | sharegpt picks the record form) or
`files`: JSONL `{prompt, chosen, rejected, margin?}` or ShareGPT conversations whose assistant
candidates carry `label: chosen | rejected` (docs/formats.md) in `train_files` / `eval_files`. A bad
record is an error naming file and line; `--config.data.skip_invalid=True` skips and counts
it. `packing=False` puts one pair per row. Truncation: data/preferences.py.

Objective: `center_coef` (reward centering, Eisenstein et al., 2023; 0 = off), `use_margin`
(subtract the records' margin). Presets: tiny; 1b and llama3_8b read your own files, e.g.
--config.init_from=runs/sft --config.data.train_files='prefs/*.jsonl'
--config.data.eval_files='prefs_eval/*.jsonl'.
"""

import ml_collections

from configs import base
from configs.models import model_config


def add_preference_data(config: ml_collections.ConfigDict) -> None:
  """The `config.data` fields of the preference stages (reward model, DPO family, KTO)."""
  # The earlier run's tokenizer, following --config.init_from (configs/base.py).
  config.data.tokenizer = base.tokenizer_of_run(config.get_ref("init_from"))
  config.data.update(dict(
      source="tiny_world",     # 'tiny_world' (tiny-world task records) | 'files' (JSONL)
      pairs_eval_files="",     # KTO on files: held-out pairs for the implicit-reward accuracy
      chat_template="default",  # 'default' | 'chatml' (data/chat_template.py)
      tiny_task="prompt",      # tiny world pairs as 'prompt' ({prompt, chosen, rejected}) or
                               # 'sharegpt' (labelled conversations) records
      tiny_task_train_records=4000,
      tiny_task_eval_records=256,
      packing=True,            # several pairs per row (False: one pair per row)
      pack_bins=16,
  ))


def set_tiny(config: ml_collections.ConfigDict) -> None:
  """The tiny world's model, data sizes and schedule (CPU, minutes)."""
  config.init_from = "runs/sft_tiny"
  config.model = model_config("tiny")  # must match the run it starts from
  config.data.tokenizer_vocab_size = config.model.vocab_size
  config.data.seq_len = 128            # two to three pairs per row
  config.data.global_batch_size = 16
  config.train.steps = 150
  config.train.eval_every = 50
  config.train.eval_steps = 16         # all 256 held-out pairs
  config.train.log_every = 10
  config.checkpoint.every_steps = 150


def set_large(config: ml_collections.ConfigDict, arg: str) -> None:
  """Model preset `arg` on your own JSONL files in ChatML, sharded over FSDP."""
  config.model = model_config(arg)
  config.data.source = "files"
  config.data.chat_template = "chatml"
  config.data.seq_len = {"1b": 2048, "llama3_8b": 4096}[arg]
  config.data.global_batch_size = 64
  config.train.eval_every = 200
  config.train.eval_steps = 20
  config.checkpoint.every_steps = 200
  config.mesh.fsdp = -1
  config.mesh.data = 1


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "reward"
  config.objective = ml_collections.ConfigDict(dict(
      name="reward",
      center_coef=0.0,         # eta of eta (r_w + r_l)^2 (objectives/reward.py)
      use_margin=True,         # subtract the records' `margin` (0 where absent)
  ))
  add_preference_data(config)
  if arg == "tiny":
    set_tiny(config)
    config.optimizer.update(dict(lr=3e-4, warmup_steps=15, weight_decay=0.0))
  elif arg in ("1b", "llama3_8b"):
    set_large(config, arg)
    # One epoch at a small rate, as InstructGPT's reward models (Ouyang et al., 2022, app. C.2:
    # 9e-6, cosine, a single epoch to avoid overfitting).
    config.train.steps = 2000
    config.optimizer.update(dict(lr=9e-6, warmup_steps=50, weight_decay=0.0))
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, 1b, llama3_8b")
  return config

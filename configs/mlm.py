"""Masked-LM (BERT-style) pretraining of the bidirectional encoder (models/encoder.py).

Run the tiny preset (embedded tiny-world data, trains its own tokenizer, CPU in minutes):

  python -m scripts.train --config configs/mlm.py:tiny --workdir runs/mlm_tiny

15% of each document's tokens are selected (80% -> <|mask|>, 10% -> a random token, 10% kept;
data/mlm_masking.py), masks seeded by `config.seed` and the document's index; the loss and
`masked_accuracy` count the selected positions only (chance: 1 / vocab_size). Other presets:
`base` (BERT-base shape on your own files: --config.data.train_files=... and eval_files).
"""

import ml_collections

from configs import base
from configs.models import model_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "mlm"
  config.objective = ml_collections.ConfigDict(dict(
      name="mlm",
      mask_rate=0.15,          # share of a document's maskable tokens selected (BERT: 0.15)
      mask_token_rate=0.8,     # of the selected: replaced by <|mask|>
      random_token_rate=0.1,   # of the selected: replaced by a random token (the rest: kept)
  ))
  if arg == "tiny":
    config.model = model_config("tiny")
    config.data.source = "tiny_world"
    config.data.tokenizer_vocab_size = config.model.vocab_size
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.train.steps = 600
    config.train.eval_every = 100
    config.train.eval_steps = 8
    config.train.log_every = 20
    config.checkpoint.every_steps = 200
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 50
  elif arg == "base":
    # BERT-base (Devlin et al., 2019): 12 layers, d 768, 12 heads, GELU MLP 3072, LayerNorm,
    # learned positions; 256 x 512 tokens per batch.
    config.model = model_config("125m")
    config.model.update(dict(mlp_dim=3072, norm="layernorm", norm_eps=1e-12, position="learned",
                             activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                             max_length=512))
    config.data.source = "files"
    config.data.seq_len = 512
    config.data.global_batch_size = 256
    config.data.tokenizer_vocab_size = config.model.vocab_size
    config.train.steps = 1_000_000
    config.train.eval_every = 5000
    config.checkpoint.every_steps = 5000
    config.optimizer.update(dict(lr=1e-4, warmup_steps=10_000, schedule="linear",
                                 end_lr_ratio=0.0, b2=0.999, weight_decay=0.01))
    config.mesh.fsdp = -1
    config.mesh.data = 1
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, base")
  return config

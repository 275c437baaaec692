"""Causal-LM pretraining.

Run the tiny preset (embedded tiny-world data, trains its own tokenizer, CPU in minutes):

  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny

Other presets: `tiny_moe` (tiny with 8 routed experts, 2 per token), `bench` (benchmark
shape), `125m`, `1b`, `llama3_8b`, and the published families' shapes (`qwen3_8b`,
`gemma2_9b`, `gemma3_12b`, `mixtral_8x7b`, `qwen3_30b_a3b`: continued pretraining from a
converted checkpoint, `--config.init_from=...`, and pod-fit checks). Any field can be overridden, e.g.
`--config.optimizer.lr=3e-4 --config.data.train_files='corpus/*.jsonl'`; an unknown key is an
error that names it.
"""

import ml_collections

from configs import base
from configs.models import model_config


# configs/models.py's presets of published families (shapes as released; bf16, full remat).
FAMILY_PRESETS = ("qwen3_8b", "gemma2_9b", "gemma3_12b", "mixtral_8x7b", "qwen3_30b_a3b")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "pretrain"
  config.objective = ml_collections.ConfigDict(dict(name="clm", z_loss=0.0))
  if arg in ("tiny", "tiny_moe"):
    # tiny_moe: the same run with 8 routed experts per layer (models/moe.py).
    config.model = model_config(arg)
    config.data.source = "tiny_world"
    config.data.tokenizer_vocab_size = config.model.vocab_size
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.train.steps = 600
    config.train.eval_every = 100
    config.train.eval_steps = 8
    config.train.log_every = 20
    config.checkpoint.every_steps = 200
    config.optimizer.lr = 3e-3
    config.optimizer.warmup_steps = 50
  elif arg == "bench":
    config.model = model_config("bench")
    # Eight layers compile quickly unrolled, and XLA:CPU runs the unrolled train step faster
    # than the scanned loop, which runs one layer at a time and stacks each layer's saved
    # activations (README.md, Benchmarks). Deep presets scan: unrolled, their compile time
    # grows with depth.
    config.model.scan_layers = False
    config.data.source = "tiny_world"
    config.data.seq_len = 512
    config.data.global_batch_size = 8
    config.train.steps = 20
  elif arg in ("125m", "1b", "llama3_8b") or arg in FAMILY_PRESETS:
    config.model = model_config(arg)
    config.data.source = "files"
    config.data.seq_len = {"125m": 1024, "1b": 2048, "llama3_8b": 8192}.get(arg, 4096)
    config.data.global_batch_size = {"125m": 256, "1b": 512}.get(arg, 256)
    config.train.steps = {"125m": 100_000, "1b": 200_000}.get(arg, 500_000)
    config.train.eval_every = 1000
    config.train.log_every = 10
    config.checkpoint.every_steps = 1000
    config.optimizer.warmup_steps = 2000
    config.optimizer.lr = {"125m": 6e-4}.get(arg, 3e-4)
    config.mesh.fsdp = -1
    config.mesh.data = 1
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, tiny_moe, bench, 125m, 1b, llama3_8b, "
                     + ", ".join(FAMILY_PRESETS))
  return config

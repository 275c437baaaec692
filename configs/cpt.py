"""Continued pretraining (CPT): a pretrained LM trained further on a new domain.

Two commands on the tiny world: pretrain on its prose, then continue on its chronicle (market
ledgers, weather and caravan logs of the same towns):

  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny
  python -m scripts.train --config configs/cpt.py:tiny --workdir runs/cpt_tiny \\
      --config.init_from=runs/pretrain_tiny

Only the params of `init_from` are loaded: the optimizer state is fresh and the learning rate
warms up again from 0 over `optimizer.warmup_steps`. The tokenizer is the pretraining run's,
`{init_from}/tokenizer/spm.model` (set `--config.data.tokenizer=...` to use another one). A
`replay_weight` share of the training documents comes from the original corpus (0 disables
it), and metrics.jsonl reports held-out loss on both corpora: `eval/loss` (the new domain) and
`eval_replay/loss` (the original: forgetting), plus, once, `eval_init/loss` and
`eval_replay_init/loss` of the pretrained params (the "before").

Preset `1b`: your own files, e.g. --config.init_from=runs/pretrain_1b
--config.data.train_files='domain/*.jsonl' --config.data.eval_files='domain_eval/*.jsonl'
--config.data.replay_train_files='web/*.jsonl' --config.data.replay_eval_files='web_eval/*.jsonl'.
"""

import ml_collections

from configs import base
from configs.models import model_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "cpt"
  config.objective = ml_collections.ConfigDict(dict(name="clm", z_loss=0.0))
  # The earlier run's tokenizer, following --config.init_from (configs/base.py).
  config.data.tokenizer = base.tokenizer_of_run(config.get_ref("init_from"))
  if arg == "tiny":
    config.init_from = "runs/pretrain_tiny"
    config.model = model_config("tiny")  # must match the pretraining run's model
    config.data.source = "tiny_world"
    config.data.tiny_world_domain = "chronicle"
    config.data.tokenizer_vocab_size = config.model.vocab_size
    config.data.replay_source = "tiny_world"
    config.data.replay_tiny_world_domain = "world"
    config.data.replay_weight = 0.2
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.train.steps = 200
    config.train.eval_every = 50
    config.train.eval_steps = 8
    config.train.log_every = 10
    config.checkpoint.every_steps = 100
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 20
  elif arg == "1b":
    config.model = model_config("1b")
    config.data.source = "files"
    config.data.replay_source = "files"
    config.data.replay_weight = 0.05
    config.data.seq_len = 2048
    config.data.global_batch_size = 512
    config.train.steps = 20_000
    config.train.eval_every = 1000
    config.checkpoint.every_steps = 1000
    # Re-warm, then decay again, to a lower peak than pretraining (Ibrahim et al., 2024).
    config.optimizer.update(dict(lr=1.5e-4, warmup_steps=500))
    config.mesh.fsdp = -1
    config.mesh.data = 1
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, 1b")
  return config

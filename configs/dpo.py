"""DPO family and KTO: preference optimisation of a policy against a frozen reference.

On the tiny world, after pretraining and SFT (configs/pretrain.py, configs/sft.py):

  python -m scripts.train --config configs/dpo.py:tiny --workdir runs/dpo_tiny \\
      --config.init_from=runs/sft_tiny
  python -m scripts.train --config configs/dpo.py:tiny,simpo --workdir runs/simpo_tiny \\
      --config.init_from=runs/sft_tiny
  python -m scripts.train --config configs/dpo.py:tiny,kto --workdir runs/kto_tiny \\
      --config.init_from=runs/sft_tiny

The preset is `size[,loss]`: size tiny | 1b | llama3_8b, loss sigmoid (default) | hinge | ipo |
ipo_mean | robust | simpo | orpo | kto, each with its paper's hyperparameters (`LOSS_DEFAULTS`);
any field can still be overridden, e.g. --config.objective.label_smoothing=0.1 (cDPO). `ipo`
is IPO on summed log-probs (the paper's equation), `ipo_mean` on log-probs averaged over each
answer's tokens (what its authors ran; objectives/dpo.py).

Policy and reference both start from `init_from` (or `objective.reference`), and the
tokenizer is that run's. With `objective.reference_mode=cached` (default) the reference's
log-probs of every example are computed once before training and kept in
`{workdir}/reference_logps/` (training/stages/reference_cache.py); `in_step` runs the frozen
reference in every step instead. metrics.jsonl reports `eval/rewards/accuracies`, `margins`,
`chosen`, `rejected`, `eval/logps/*` on the eval split and `eval/pairs/accuracy` (the DPO
implicit reward beta log(pi / pi_ref) on every held-out pair; ties count 1/2, so 0.5 before
training) for every loss, KTO included.

Data: as configs/reward.py (pairs), and for KTO unpaired `{prompt, completion, label}` records
(`pairs_eval_files` then names held-out pairs for `eval/pairs/*`). Figures before training:
rerun with --config.train.steps=1 --config.optimizer.lr=0.
"""

import ml_collections

from configs import base
from configs.reward import add_preference_data, set_large, set_tiny

# Each loss's hyperparameters from its paper (objectives/dpo.py, objectives/kto.py).
LOSS_DEFAULTS = {
    "sigmoid": dict(beta=0.1),                          # Rafailov et al., 2023
    "hinge": dict(beta=0.1),                            # Zhao et al., 2023 (SLiC-HF)
    "ipo": dict(beta=0.1),                              # Azar et al., 2023 (tau)
    "ipo_mean": dict(beta=0.1),                         # the same, length-normalised margin
    "robust": dict(beta=0.1, label_smoothing=0.1),      # Chowdhury et al., 2024
    "simpo": dict(beta=2.0, simpo_gamma=1.0),           # Meng et al., 2024: gamma / beta 0.5
    "orpo": dict(beta=0.1, orpo_lambda=0.1),            # Hong et al., 2024
    "kto": dict(beta=0.1),                              # Ethayarajh et al., 2024
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  size, _, loss = arg.partition(",")
  loss = loss or "sigmoid"
  if loss not in LOSS_DEFAULTS:
    raise ValueError(f"unknown loss {loss!r} in preset {arg!r}: {', '.join(LOSS_DEFAULTS)}")
  config = base.base_config()
  config.stage = "dpo"
  config.objective = ml_collections.ConfigDict(dict(
      name="dpo",
      loss_type=loss,
      beta=0.1,
      label_smoothing=0.0,     # cDPO / robust DPO: assumed rate of flipped labels
      simpo_gamma=0.5,         # SimPO target margin
      orpo_lambda=0.1,         # ORPO weight of the odds-ratio term
      kto_desirable_weight=1.0,
      kto_undesirable_weight=1.0,
      reference="",            # reference run / checkpoint; '' = init_from
      reference_mode="cached",  # 'cached' (once, before training) | 'in_step'
  ))
  config.objective.update(LOSS_DEFAULTS[loss])
  add_preference_data(config)
  if size == "tiny":
    set_tiny(config)
    config.train.steps = 120
    config.train.eval_every = 40
    config.checkpoint.every_steps = 120
    config.optimizer.update(dict(lr=1e-4, warmup_steps=10, weight_decay=0.0))
  elif size in ("1b", "llama3_8b"):
    set_large(config, size)
    # DPO's setting (Rafailov et al., 2023, app. B): 1e-6 with 150 warm-up steps, batch 64.
    config.train.steps = 2000
    config.optimizer.update(dict(lr=5e-7 if size == "llama3_8b" else 1e-6, warmup_steps=150,
                                 schedule="linear", end_lr_ratio=0.0, weight_decay=0.0))
  else:
    raise ValueError(f"unknown preset size {size!r}: tiny, 1b, llama3_8b")
  return config

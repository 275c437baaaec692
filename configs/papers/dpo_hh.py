"""DPO on Anthropic HH (Bai et al., 2022), as Rafailov et al. (2023) train it: the SFT model
on the chosen dialogues first, then DPO (sigmoid loss, beta 0.1) on the preference pairs.

Published figure to compare with: Rafailov et al. 2023, Fig. 3 (left), single-turn HH
dialogue with Pythia-2.8B: DPO's completions win against the test set's chosen ones about
60% of the time (GPT-4 judge, best sampling temperature), the only method above the chosen
completions; DPO settings of their app. B: beta 0.1, lr 1e-6, batch 64, 150 warm-up steps.
This codebase reports `eval/pairs/accuracy` (the implicit reward beta log(pi / pi_ref) ranks
the held-out pair as labelled; 0.5 before training) and `eval/rewards/*`; a win rate needs
replies (`scripts.generate`) and a judge, outside this codebase. Pythia (GPT-NeoX) does not
convert here; the recipe runs on Qwen2.5-0.5B.

Data, as published (`Anthropic/hh-rlhf`): JSONL files (gzipped on the hub: gunzip
`train.jsonl.gz` / `test.jsonl.gz` into `data/hh/`), or Parquet exports, of {chosen, rejected}
records, each a whole dialogue "\\n\\nHuman: ...
\\n\\nAssistant: ..."; the turns both share, up to the last shared Human turn, become the
prompt, and what follows in each its reply (data/conversation.py `parse_hh_pair`). Records
whose replies are empty or identical are errors unless skipped (`skip_invalid`, on here:
HH holds a few).

Conversion and launch (SFT on the chosen dialogues is the paper's "Preferred-FT" start):

  python -m scripts.convert --from-hf /models/Qwen2.5-0.5B --to runs/qwen05b
  python -m scripts.train --config configs/papers/dpo_hh.py --workdir runs/dpo_hh \\
      --config.init_from=runs/qwen05b_sft_hh
  (with runs/qwen05b_sft_hh an SFT run of runs/qwen05b on the chosen replies, e.g.
  configs/papers/sft_alpaca.py with --config.data.train_files pointing at them as
  {instruction, output} records.) Preset `tiny`: the same recipe on the tiny model.
"""

import ml_collections

from configs import dpo
from configs.models import model_config
from configs.papers.hf_models import hf_model_config


def get_config(arg: str = "qwen2.5-0.5b") -> ml_collections.ConfigDict:
  config = dpo.get_config("1b,sigmoid")
  config.data.update(dict(source="files", chat_template="chatml", skip_invalid=True,
                          train_files="data/hh/train.jsonl", eval_files="data/hh/test.jsonl"))
  config.objective.update(dict(beta=0.1))
  if arg == "tiny":
    config.model = model_config("tiny")
    config.data.update(dict(seq_len=128, global_batch_size=4))
    config.train.update(dict(steps=2, eval_every=2, log_every=1))
    config.mesh.update(dict(fsdp=1, data=-1))
  elif arg == "qwen2.5-0.5b":
    config.model = hf_model_config(arg)
    config.data.update(dict(seq_len=512, global_batch_size=64))
    # One epoch of HH's 160,800 training pairs at batch 64, as the paper.
    config.train.update(dict(steps=2500, eval_every=250))
    config.optimizer.update(dict(lr=1e-6, warmup_steps=150, schedule="constant",
                                 weight_decay=0.0))
  else:
    raise ValueError(f"unknown preset {arg!r}: qwen2.5-0.5b, tiny")
  return config

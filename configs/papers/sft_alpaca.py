"""SFT on Stanford Alpaca (Taori et al., 2023): 52,002 instruction-following demonstrations,
published as one JSON array `alpaca_data.json` of {instruction, input, output} records
(`input` empty for most), read as is (data/records.py reads .json arrays and Parquet).

Published figure to compare with: Alpaca 7B (LLaMA-7B fine-tuned 3 epochs, lr 2e-5, batch
128, 512 tokens) won 90 of 179 blind pairwise comparisons against text-davinci-003 on the
self-instruct evaluation set (89 losses); the Alpaca recipe on a 0.5B model is a smaller
replica: compare `eval/loss` on held-out records and greedy replies (`scripts.generate`)
rather than that win count.

Data: `alpaca_data.json` from the tatsu-lab/stanford_alpaca repository (or the hub's
`tatsu-lab/alpaca` Parquet files, same fields plus `text`), split by hand into a training
array and a held-out one (nothing here downloads):

  python -c "import json; d = json.load(open('alpaca_data.json')); \\
      json.dump(d[:-1000], open('data/alpaca/train.json', 'w')); \\
      json.dump(d[-1000:], open('data/alpaca/eval.json', 'w'))"

Conversion and launch:

  python -m scripts.convert --from-hf /models/Qwen2.5-0.5B --to runs/qwen05b
  python -m scripts.train --config configs/papers/sft_alpaca.py --workdir runs/sft_alpaca \\
      --config.init_from=runs/qwen05b

Preset `tiny`: the same recipe on the tiny model (tests: the files they write).
"""

import ml_collections

from configs import sft
from configs.models import model_config
from configs.papers.hf_models import hf_model_config


def get_config(arg: str = "qwen2.5-0.5b") -> ml_collections.ConfigDict:
  config = sft.get_config("1b")
  config.data.update(dict(source="files", chat_template="chatml", format="alpaca",
                          train_files="data/alpaca/train.json",
                          eval_files="data/alpaca/eval.json"))
  config.eval.update(dict(num_prompts=64))
  if arg == "tiny":
    config.model = model_config("tiny")
    config.data.update(dict(seq_len=128, global_batch_size=4))
    config.eval.update(dict(num_prompts=4, max_new_tokens=16, batch_size=4))
    config.train.update(dict(steps=2, eval_every=2, eval_steps=1, log_every=1))
    config.mesh.update(dict(fsdp=1, data=-1))
  elif arg == "qwen2.5-0.5b":
    config.model = hf_model_config(arg)
    config.data.update(dict(seq_len=512, global_batch_size=128))
    # Alpaca's recipe: 3 epochs of 51k records at batch 128 (packed several to a row here,
    # so fewer steps make the 3 epochs), lr 2e-5 cosine with 3% warm-up, no weight decay.
    config.train.update(dict(steps=600, eval_every=100))
    config.optimizer.update(dict(lr=2e-5, warmup_steps=20, weight_decay=0.0))
  else:
    raise ValueError(f"unknown preset {arg!r}: qwen2.5-0.5b, tiny")
  return config

"""GRPO on GSM8K (Cobbe et al., 2021) from Qwen2.5-0.5B-Instruct, rewarded by the math answer
checker (data/math_answers.py): 1 when the reply's final number equals the reference's.

Published figure to compare with: GSM8K test accuracy of Qwen2.5-0.5B-Instruct, 49.6 as
released (Qwen2.5 report) -> 56.7 after PPO in verl's published baselines ("Algorithm
baselines", GSM8K, greedy). The "before" depends on the prompt and the answer extraction:
measure your own with `scripts.evaluate --tasks` (last command below) before comparing gains.

Data, as published (`openai/gsm8k`, config `main`): Parquet files of {question, answer}
records whose answer is the worked solution ending in `#### N`; the question becomes the
prompt and the whole solution the reference (data/conversation.py `parse_prompt`). Download
`main/train-00000-of-00001.parquet` and `main/test-00000-of-00001.parquet` from the hub to
`data/gsm8k/` by hand (nothing here downloads), or point the globs at JSONL files of the same
records. A prepared tfds dataset works too: `--config.data.source=tfds
--config.data.tfds_name=huggingface:gsm8k/main` passes the name through to tfds.

Conversion and launch:

  python -m scripts.convert --from-hf /models/Qwen2.5-0.5B-Instruct --to runs/qwen05b_instruct
  python -m scripts.train --config configs/papers/grpo_gsm8k.py --workdir runs/grpo_gsm8k \\
      --config.init_from=runs/qwen05b_instruct
  python -m scripts.evaluate --workdir runs/grpo_gsm8k --tasks data/gsm8k/test_tasks.jsonl

where test_tasks.jsonl holds generation tasks `{"type": "generation", "prompt": question,
"answer": solution, "checker": "math"}` (docs/formats.md, Evaluation tasks). Hyperparameters
follow verl's GSM8K GRPO example: 5 replies per prompt at temperature 1, lr 1e-6, KL 0.001
(k3, in the loss), 1024-token replies; `eval/answer_accuracy` is greedy held-out accuracy.
Preset `tiny` is the same recipe on the tiny model (tests: the files they write).
"""

import ml_collections

from configs import grpo
from configs.models import model_config
from configs.papers.hf_models import hf_model_config


def get_config(arg: str = "qwen2.5-0.5b") -> ml_collections.ConfigDict:
  config = grpo.get_config("1b")
  config.data.update(dict(source="files", chat_template="chatml",
                          train_files="data/gsm8k/train-*.parquet",
                          eval_files="data/gsm8k/test-*.parquet", answer_checker="math"))
  config.reward.update(dict(function="answer", model="", missing_stop_penalty=0.0))
  config.objective.update(dict(kl_coef=0.001, loss_level="token"))
  if arg == "tiny":
    config.model = model_config("tiny")
    config.rl.update(dict(prompts_per_iteration=4, samples_per_prompt=4, max_prompt_len=96,
                          max_new_tokens=32, minibatches=1))
    config.eval.update(dict(num_prompts=4, max_new_tokens=32, batch_size=4, samples=0))
    config.train.update(dict(steps=2, eval_every=2, log_every=1))
    config.mesh.update(dict(fsdp=1, data=-1))
  elif arg == "qwen2.5-0.5b":
    config.model = hf_model_config(arg)
    config.rl.update(dict(prompts_per_iteration=1024, samples_per_prompt=5, max_prompt_len=512,
                          max_new_tokens=1024, minibatches=4, epochs=1, temperature=1.0))
    config.eval.update(dict(num_prompts=1319, max_new_tokens=1024, batch_size=256))
    config.train.update(dict(steps=105, eval_every=5))  # 15 epochs of 7473 questions
    config.optimizer.update(dict(lr=1e-6, warmup_steps=0, schedule="constant"))
  else:
    raise ValueError(f"unknown preset {arg!r}: qwen2.5-0.5b, tiny")
  return config

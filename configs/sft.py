"""SFT / instruction tuning: a pretrained LM trained on conversations, loss on assistant tokens.

Two commands on the tiny world: pretrain on its prose, then instruction-tune on its question /
answer conversations (Alpaca and multi-turn ShareGPT records, data/tiny_tasks.py):

  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny
  python -m scripts.train --config configs/sft.py:tiny --workdir runs/sft_tiny \\
      --config.init_from=runs/pretrain_tiny

Only the params of `init_from` are loaded (fresh optimizer, learning-rate warm-up again). The
tokenizer is that run's, `{init_from}/tokenizer/spm.model` (set `--config.data.tokenizer=...`
to use another one). metrics.jsonl reports `eval/loss` (held-out conversations, assistant
tokens only) and, from greedy generation on held-out questions, `eval/answer_accuracy`,
`eval/exact_match` and `eval/stop_rate` (training/stages/sft.py). The base model's figures:

  python -c "from configs import sft; from training.stages.sft import evaluate_checkpoint; \\
      print(evaluate_checkpoint(sft.get_config('tiny'), 'runs/pretrain_tiny'))"

SFT fields: `data.format` auto | alpaca | sharegpt (records of another format are errors),
`data.chat_template` default | chatml, `data.supervise` all | last (assistant turns with loss),
`data.tiny_task` alpaca | sharegpt | mixed | tools (source tiny_world), `objective.normalize`
token | example, `eval.*` (held-out generation), and `data.replay_*` (base config): a
`replay_weight` share of the training examples are pretraining documents (plain next-token
loss), which limits forgetting; the tiny preset replays 30% of the tiny world's prose.
Truncation of conversations longer than `data.seq_len`: data/sft.py.

Preset `tiny_tools`: tool-use demonstrations (`data.tiny_task=tools`, data/tool_tasks.py:
question -> lookup / calc calls -> results -> answer; loss on the model's turns only) from the
tiny SFT model, the first step of the tool-use chain (docs/results_rl.md, "Tools"):

  python -m scripts.train --config configs/sft.py:tiny_tools --workdir runs/sft_tools_tiny \\
      --config.init_from=runs/sft_tiny
  python -m scripts.train --config configs/grpo.py:tiny_tools --workdir runs/grpo_tools_tiny \\
      --config.init_from=runs/sft_tools_tiny

Presets `1b` and `llama3_8b`: your own JSONL files in ChatML, e.g. --config.init_from=runs/base
--config.data.tokenizer=tok.model --config.data.train_files='sft/*.jsonl'
--config.data.eval_files='sft_eval/*.jsonl' [--config.eval.prompt_files='qa.jsonl' with
{prompt, answer} records for answer accuracy].
"""

import ml_collections

from configs import base
from configs.models import model_config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = base.base_config()
  config.stage = "sft"
  config.objective = ml_collections.ConfigDict(dict(
      name="sft", z_loss=0.0,
      normalize="token",       # 'token': every assistant token weighs the same; 'example':
                               # every conversation does (objectives/sft.py)
  ))
  # The earlier run's tokenizer, following --config.init_from (configs/base.py).
  config.data.tokenizer = base.tokenizer_of_run(config.get_ref("init_from"))
  config.data.update(dict(
      format="auto",           # 'auto' | 'alpaca' | 'sharegpt' record format (docs/formats.md)
      chat_template="default",  # 'default' | 'chatml' (data/chat_template.py)
      supervise="all",         # loss on 'all' assistant turns or only the 'last' one
      tiny_task="mixed",       # source tiny_world: 'alpaca' | 'sharegpt' | 'mixed' | 'tools'
      tiny_task_train_records=4000,
      tiny_task_eval_records=200,
      pack_bins=16,
  ))
  # Held-out generation at every evaluation (training/stages/sft.py evaluate).
  config.eval = ml_collections.ConfigDict(dict(
      num_prompts=64,          # held-out prompts (tiny world: distinct validation questions)
      max_new_tokens=32,
      batch_size=64,           # prompts generated at once
      prompt_files="",         # JSONL {prompt, answer} records; '' = from the data source
  ))
  if arg in ("tiny", "tiny_tools"):
    config.init_from = "runs/pretrain_tiny"
    config.model = model_config("tiny")  # must match the pretraining run's model
    config.data.source = "tiny_world"
    config.data.tokenizer_vocab_size = config.model.vocab_size
    # Replaying the pretraining prose keeps what the base model knew: without it the tuned
    # model forgets facts and fails to copy held-out names (docs/results_sft.md).
    config.data.replay_source = "tiny_world"
    config.data.replay_tiny_world_domain = "world"
    config.data.replay_weight = 0.3
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.train.steps = 200
    config.train.eval_every = 50
    config.train.eval_steps = 8
    config.train.log_every = 10
    config.checkpoint.every_steps = 100
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 20
    if arg == "tiny_tools":
      # A few tool-use demonstrations (data/tool_tasks.py) on top of the tiny SFT model:
      # 800 train questions answered by lookup / calc calls, half of them in counterfactual
      # worlds (where only the tools' results give the answer); a price question's episode is
      # ~130 tokens, hence the longer rows. Held-out figures with the tools come from the
      # RL evaluation (configs/grpo.py:tiny_tools at iteration 0): SFT's own answer accuracy
      # reads the first reply only, which is a call.
      config.init_from = "runs/sft_tiny"
      config.data.update(dict(tiny_task="tools", tiny_task_train_records=800,
                              tiny_task_eval_records=64, seq_len=256))
      # 500 steps: at 200 the model calls the tools right but still answers from memory
      # (20 of the 37 held-out questions against 24 at 500; docs/results_rl.md, "Tools").
      config.train.update(dict(steps=500, eval_every=100, eval_steps=4))
      config.optimizer.warmup_steps = 10
  elif arg in ("1b", "llama3_8b"):
    config.model = model_config(arg)
    config.data.source = "files"
    config.data.chat_template = "chatml"
    config.data.seq_len = {"1b": 2048, "llama3_8b": 4096}[arg]
    config.data.global_batch_size = {"1b": 128, "llama3_8b": 64}[arg]
    # About 3 epochs of ~50k conversations (Alpaca-sized) packed several to a row.
    config.train.steps = {"1b": 3000, "llama3_8b": 3000}[arg]
    config.train.eval_every = 500
    config.train.eval_steps = 20
    config.checkpoint.every_steps = 500
    config.eval.update(dict(num_prompts=256, max_new_tokens=256, batch_size=64))
    # As LLaMA 2-Chat's SFT (Touvron et al., 2023, sec. 3.1): cosine from 2e-5, weight decay
    # 0.1, 64 sequences of 4096 tokens; the smaller model takes a larger rate.
    config.optimizer.update(dict(lr={"1b": 5e-5, "llama3_8b": 2e-5}[arg], warmup_steps=100,
                                 weight_decay=0.1))
    config.mesh.fsdp = -1
    config.mesh.data = 1
  else:
    raise ValueError(f"unknown preset {arg!r}: tiny, tiny_tools, 1b, llama3_8b")
  return config

"""RL prompts: records from the source layer, rendered and cut to the prompt budget."""

import json

import pytest

from configs import ppo as ppo_config
from data import prompts
from data.chat_template import render_prompt
from data.conversation import Turn


def rl_config(**data):
  config = ppo_config.get_config("tiny")
  config.data.update(dict(tiny_task_train_records=24, tiny_task_eval_records=8), **data)
  config.rl.max_prompt_len = 12
  return config


def test_fit_prompt_keeps_bos_and_the_end():
  assert prompts.fit_prompt([2, 4, 5, 6, 7], 3) == [2, 6, 7]
  assert prompts.fit_prompt([2, 4], 3) == [2, 4]


def test_prompts_are_rendered_and_fitted(tiny_tokenizer, tmp_path):
  config = rl_config()
  items = prompts.load_prompts(config, tiny_tokenizer, "train", str(tmp_path))
  for item in items:
    full = render_prompt(tiny_tokenizer, item.prompt.context, "default")
    assert list(item.tokens) == prompts.fit_prompt(full, 12) and len(item.tokens) <= 12
    assert item.prompt.answer
  # A repeated question counts once with `distinct`; `limit` keeps the first ones.
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in (
      {"prompt": "What is 2 plus 2?", "answer": "4"}, {"prompt": "What is 2 plus 2?"},
      {"prompt": [{"from": "user", "value": "Name a town."}]})))
  files = rl_config(source="files", eval_files=str(path))
  assert len(prompts.load_prompts(files, tiny_tokenizer, "eval", "")) == 3
  distinct = prompts.load_prompts(files, tiny_tokenizer, "eval", "", distinct=True)
  assert [it.prompt.context for it in distinct] == [(Turn("user", "What is 2 plus 2?"),),
                                                    (Turn("user", "Name a town."),)]
  assert len(prompts.load_prompts(files, tiny_tokenizer, "eval", "", limit=1)) == 1
  with pytest.raises(ValueError, match="config.data.train_files is empty"):
    prompts.load_prompts(files, tiny_tokenizer, "train", "")

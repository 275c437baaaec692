"""Prompts for RL and synthesis: prompt records -> chat-template tokens that fit the prompt budget.

    records (data/sources.py kind 'prompts': the tiny world's `config.data.tiny_prompts` set,
    or JSONL {prompt, answer?} files, docs/formats.md)
      -> rendered with the assistant header (data/chat_template.py `render_prompt`)
      -> cut to `config.rl.max_prompt_len` tokens, keeping BOS and the end (`fit_prompt`)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections

from data import chat_template
from data import sources
from data.conversation import Prompt


@dataclasses.dataclass(frozen=True)
class PromptItem:
  prompt: Prompt             # context (ends with the user's turn) and optional answer
  tokens: tuple[int, ...]    # rendered with the assistant header, at most max_prompt_len


def fit_prompt(tokens: Sequence[int], max_len: int) -> list[int]:
  """Keeps the first token (BOS) and the last `max_len - 1`: the question and the assistant
  header are at the end."""
  tokens = list(tokens)
  return tokens if len(tokens) <= max_len else tokens[:1] + tokens[len(tokens) - max_len + 1:]


def load_prompts(config: ml_collections.ConfigDict, tokenizer, split: str, workdir: str, *,
                 distinct: bool = False, limit: int = 0) -> list[PromptItem]:
  """The rendered prompts of `split` ('train' | 'eval').

  Args:
    config: the stage config: `data` (source, files, tiny_prompts, chat_template,
      skip_invalid), `rl.max_prompt_len`, and `seed`, which picks the tiny world's questions.
    tokenizer: data/tokenizer.py Tokenizer with the chat symbols.
    split: 'train' or 'eval'.
    workdir: where source 'tiny_world' writes its prompt records.
    distinct: drop repeated prompts.
    limit: > 0 keeps the first `limit` prompts.
  """
  items, seen = [], set()
  for p in sources.load_records(config.data, "prompts", split, workdir, seed=config.seed):
    if distinct:
      if p.context in seen:
        continue
      seen.add(p.context)
    tokens = chat_template.render_prompt(tokenizer, p.context, config.data.chat_template)
    items.append(PromptItem(p, tuple(fit_prompt(tokens, config.rl.max_prompt_len))))
    if limit and len(items) == limit:
      break
  if not items:
    raise ValueError(f"no {split} prompts")
  return items

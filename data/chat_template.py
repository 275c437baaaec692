"""Chat templates: a conversation rendered to token ids plus a per-token loss mask.

Two templates, both built from the tokenizer's reserved chat symbols (single tokens):

  default   [BOS] <|system|> text <|end_of_turn|> <|user|> text <|end_of_turn|>
            <|assistant|> text <|end_of_turn|> ...
  chatml    [BOS] <|im_start|> "system\\n" text <|im_end|> "\\n" <|im_start|> "user\\n" ...
            (the ChatML layout of OpenAI / Qwen; role names and newlines are ordinary text)

The loss mask marks the tokens a model is trained to produce: an assistant turn's text and
its closing token (<|end_of_turn|> or <|im_end|>), so the model learns to stop; never the
role headers, system or user text. `supervise="last"` marks only the final assistant turn.
Generation renders the context plus the assistant header (`render_prompt`) and stops at the
template's closing token (`stop_ids`).

Rendering is piecewise: each text is encoded on its own and the pieces are concatenated, so
a prompt renders to exactly the prefix of the full conversation's tokens, whatever the
tokenizer does at text boundaries.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from data.conversation import Conversation, Turn

TEMPLATES = ("default", "chatml")


@dataclasses.dataclass(frozen=True)
class Rendered:
  tokens: np.ndarray      # int32 [n]
  loss_mask: np.ndarray   # float32 [n]: 1 where token i is a supervised target


def _check(template: str) -> None:
  if template not in TEMPLATES:
    raise ValueError(f"unknown chat template {template!r}; choose one of {TEMPLATES}")


def _symbol(tokenizer, piece: str) -> int:
  token = tokenizer.token_to_id(piece)
  if token is None or token == tokenizer.unk_id:
    raise ValueError(f"the tokenizer has no {piece!r} symbol needed by the chat template")
  return token


def _header(tokenizer, role: str, template: str) -> list[int]:
  if template == "default":
    return [_symbol(tokenizer, f"<|{role}|>")]
  return [_symbol(tokenizer, "<|im_start|>")] + tokenizer.encode(f"{role}\n")


def _closing(tokenizer, template: str) -> tuple[list[int], list[int]]:
  """(supervised closing tokens, unsupervised separator after them)."""
  if template == "default":
    return [_symbol(tokenizer, "<|end_of_turn|>")], []
  return [_symbol(tokenizer, "<|im_end|>")], tokenizer.encode("\n")


def stop_ids(tokenizer, template: str) -> list[int]:
  """Token ids that end an assistant reply under `template` (plus EOS)."""
  _check(template)
  return [_closing(tokenizer, template)[0][0], tokenizer.eos_id]


def render(tokenizer, conversation: Sequence[Turn], template: str = "default", *,
           supervise: str = "all", add_bos: bool = True) -> Rendered:
  """Token ids and loss mask of a whole conversation.

  Args:
    tokenizer: data/tokenizer.py Tokenizer (needs the chat symbols).
    conversation: turns; assistant turns are the supervised ones.
    template: 'default' | 'chatml'.
    supervise: 'all' assistant turns or only the 'last' one.
    add_bos: start with BOS.
  """
  _check(template)
  if supervise not in ("all", "last"):
    raise ValueError(f"supervise must be 'all' or 'last', got {supervise!r}")
  last_assistant = max((i for i, t in enumerate(conversation) if t.role == "assistant"),
                       default=-1)
  tokens, mask = ([tokenizer.bos_id], [0.0]) if add_bos else ([], [])
  close, separator = _closing(tokenizer, template)
  for i, turn in enumerate(conversation):
    supervised = turn.role == "assistant" and (supervise == "all" or i == last_assistant)
    header = _header(tokenizer, turn.role, template)
    body = tokenizer.encode(turn.content) + close
    tokens += header + body + separator
    mask += [0.0] * len(header) + [float(supervised)] * len(body) + [0.0] * len(separator)
  return Rendered(np.asarray(tokens, np.int32), np.asarray(mask, np.float32))


def render_prompt(tokenizer, context: Conversation, template: str = "default", *,
                  add_bos: bool = True) -> list[int]:
  """Token ids of `context` followed by the assistant header: the input for generation."""
  rendered = render(tokenizer, context, template, add_bos=add_bos)
  return rendered.tokens.tolist() + _header(tokenizer, "assistant", template)


def render_completion(tokenizer, completion: str, template: str = "default") -> list[int]:
  """Token ids of an assistant reply with its closing token (what `render` supervises)."""
  _check(template)
  return tokenizer.encode(completion) + _closing(tokenizer, template)[0]

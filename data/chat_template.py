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

Tool calls (multi-turn episodes, data/tools.py, training/rl/episodes.py). The model calls a
tool by writing a call block in an assistant turn, which then ends as any reply does (its
closing token); the environment answers with a `tool` turn whose text the template wraps in
a result block, followed by the next assistant header:

  <|assistant|> <tool>lookup: salt, price</tool> <|end_of_turn|>          (model: loss)
  <|system|> <result>A sack of salt costs 4 coins.</result> <|end_of_turn|>
  <|assistant|>                                                            (environment: none)
  9 sacks of salt cost 36 coins. <|end_of_turn|>                           (model: loss)

The tokenizer's chat symbols are fixed (data/tokenizer.py), so the default template heads a
tool turn with <|system|> (the result block tells it from a system prompt); chatml names the
role `tool` (`<|im_start|>tool\n<result>...</result><|im_end|>\n`). A tool turn is never
supervised. `parse_tool_call` reads a reply's call (`ToolCall`: name and argument text; a
malformed block is a `ToolCallError`), `tool_result_tokens` gives what the environment
appends after a call turn, and `render` of the whole conversation equals the prompt, the
replies and those appended tokens concatenated (tests/data/test_tools.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from data.conversation import Conversation, Turn

TEMPLATES = ("default", "chatml")
TOOL_ROLE = "tool"
CALL_OPEN, CALL_CLOSE = "<tool>", "</tool>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
# Templates whose symbols have no tool role: the tool turn's header borrows another role's.
_HEADER_ROLES = {"default": {TOOL_ROLE: "system"}, "chatml": {}}
# `name: arguments`: a tool name, a colon, the rest of the block. The arguments follow a space
# so their words are tokenized as in running text (SentencePiece's word-initial pieces: a
# name is copied from the question with the same tokens).
_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z_0-9]*)\s*:(.*)", re.S)


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
  role = _HEADER_ROLES[template].get(role, role)
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
    text = format_tool_result(turn.content) if turn.role == TOOL_ROLE else turn.content
    body = tokenizer.encode(text) + close
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


# --- Tool calls (module docstring) ----------------------------------------------------------

class ToolCallError(ValueError):
  """A reply's call block is malformed (the environment answers with the message)."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
  name: str        # the tool: `lookup` in `<tool>lookup: salt, price</tool>`
  arguments: str   # the text after the colon, stripped: `salt, price`


def format_tool_call(name: str, arguments: str) -> str:
  """The call block a model writes: `<tool>name: arguments</tool>`."""
  return f"{CALL_OPEN}{name}: {arguments}{CALL_CLOSE}"


def format_tool_result(text: str) -> str:
  """The result block of a tool turn: `<result>text</result>`."""
  return f"{RESULT_OPEN}{text}{RESULT_CLOSE}"


def parse_tool_call(reply: str) -> ToolCall | None:
  """The first call block of `reply`, or None when it has none (a final answer).

  Raises:
    ToolCallError: a block opened and not closed, closed and not opened, or whose content is
      not `name: arguments`.
  """
  start = reply.find(CALL_OPEN)
  if start < 0:
    if CALL_CLOSE in reply:
      raise ToolCallError(f"{CALL_CLOSE} without {CALL_OPEN}")
    return None
  end = reply.find(CALL_CLOSE, start)
  if end < 0:
    raise ToolCallError(f"{CALL_OPEN} is never closed by {CALL_CLOSE}")
  body = reply[start + len(CALL_OPEN):end]
  match = _CALL.fullmatch(body)
  if match is None:
    raise ToolCallError(f"expected name: arguments inside {CALL_OPEN}{CALL_CLOSE}, got "
                        f"{body!r}")
  return ToolCall(match[1], match[2].strip())


def tool_result_tokens(tokenizer, result: str, template: str = "default") -> list[int]:
  """What the environment appends after an assistant turn that made a call (the model wrote
  its closing token): the template's separator (chatml), the tool turn holding `result` in
  its result block, and the next assistant header. No token of it is supervised."""
  _check(template)
  separator = _closing(tokenizer, template)[1]
  turn = render(tokenizer, (Turn(TOOL_ROLE, result),), template, add_bos=False)
  return separator + turn.tokens.tolist() + _header(tokenizer, "assistant", template)

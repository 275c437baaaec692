"""Dialogues stored as one string, as Anthropic's HH-RLHF publishes them:

    "\\n\\nHuman: What is a good first bike?\\n\\nAssistant: A used hybrid ...\\n\\nHuman: ..."

`split_dialogue` cuts such a string into (role, content) turns; a preference record holds
two of them (`chosen`, `rejected`) that share every turn but the last replies, and
`shared_context` finds that common prefix, so data/conversation.py can make it the pair's
prompt (Rafailov et al., 2023 train DPO on HH this way; TRL's `extract_prompt` takes the same
longest common prefix). Pure strings in and out, no record types: a leaf module.
"""

from __future__ import annotations

import re

ROLE_MARKERS = {"Human": "user", "Assistant": "assistant"}
_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def looks_like_dialogue(text: str) -> bool:
  """Whether `text` opens with a `Human:` turn (after optional blank lines)."""
  return text.lstrip("\n").startswith("Human:")


def split_dialogue(text: str) -> list[tuple[str, str]]:
  """`(role, content)` turns ('user' / 'assistant') of a `\\n\\nHuman: ...` string.

  Content is stripped; consecutive turns of one speaker (a few HH records have them) are
  joined with a blank line, so turns alternate; an empty final turn is kept empty.

  Raises:
    ValueError: text before the first marker, or no marker at all.
  """
  parts = _MARKER.split(text)
  if len(parts) < 3 or parts[0].strip():
    raise ValueError("expected a dialogue of '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' "
                     f"turns, got {text[:60]!r}")
  turns: list[tuple[str, str]] = []
  for marker, content in zip(parts[1::2], parts[2::2]):
    role, content = ROLE_MARKERS[marker], content.strip()
    if turns and turns[-1][0] == role:
      turns[-1] = (role, f"{turns[-1][1]}\n\n{content}".strip())
    else:
      turns.append((role, content))
  return turns


def join_dialogue(turns: list[tuple[str, str]]) -> str:
  """The inverse of `split_dialogue`, without the leading blank lines."""
  names = {v: k for k, v in ROLE_MARKERS.items()}
  return "\n\n".join(f"{names[role]}: {content}" for role, content in turns)


def shared_context(first: list[tuple[str, str]], second: list[tuple[str, str]]) -> int:
  """Length of the longest common prefix of two turn lists that ends with a user turn
  (0 if none): the prompt both replies continue."""
  common = 0
  while common < min(len(first), len(second)) and first[common] == second[common]:
    common += 1
  while common and first[common - 1][0] != "user":
    common -= 1
  return common

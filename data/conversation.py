"""Instruction and preference records (docs/formats.md) parsed into one canonical conversation type.

Every supported format becomes tuples of `Turn(role, content)` with roles 'system', 'user'
and 'assistant':

  Alpaca              {instruction, input?, output}            -> user, assistant
  Alpaca multi-turn   {instruction, conversations: [...]}      -> system (instruction), turns
  ShareGPT            {conversations: [{from, value}, ...]}    -> turns (system optional;
                      'tool' turns after an assistant's call in tool-use records)
  ShareGPT prefs      assistant candidates with label chosen / rejected -> PreferencePairs
  prompt/chosen/rejected {prompt (text or turns), chosen, rejected, margin?} -> PreferencePair
  Anthropic HH        {chosen, rejected} whole "\\n\\nHuman: ..." dialogues -> PreferencePair
                      (the shared turns are the context)
  unpaired feedback   {prompt, completion, label: bool}        -> Feedback (KTO)
  prompts only        {prompt, answer?} (GSM8K: {question, answer}) -> Prompt (RL, synthesis)

An SFT record may also be checked against one form (`SFT_FORMATS`, `config.data.format`).
Validation raises `InvalidRecord`; the readers below (through data/records.py) turn it into a
`RecordError` naming file and line, or skip and count the record with `skip_invalid`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator

from data import dialogue_text
from data.records import InvalidRecord, SkipCounter, iter_jsonl_records, require_text

SFT_FORMATS = ("auto", "alpaca", "sharegpt")  # config.data.format
ROLES = ("system", "user", "assistant", "tool")
# 'tool': a tool's result in a tool-use conversation (data/chat_template.py, data/tools.py).
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                 "gpt": "assistant", "tool": "tool"}
# The roles each turn may follow (None: the first turn after the optional system prompt): a
# tool turn answers an assistant's call, and the assistant goes on after it.
_FOLLOWS = {"user": (None, "assistant"), "assistant": ("user", "tool"), "tool": ("assistant",)}
LABELS = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str      # 'system' | 'user' | 'assistant'
  content: str


Conversation = tuple  # tuple[Turn, ...]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """`context` ends with a user turn; `chosen` / `rejected` are competing assistant replies."""
  context: Conversation
  chosen: str
  rejected: str
  margin: float | None = None


@dataclasses.dataclass(frozen=True)
class Feedback:
  """One unpaired completion judged desirable or not (KTO)."""
  context: Conversation
  completion: str
  desirable: bool


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A context to complete, with an optional reference answer for a verifiable reward."""
  context: Conversation
  answer: str | None = None


def _object(obj: Any) -> dict:
  if not isinstance(obj, dict):
    raise InvalidRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
  return obj


def _turns(obj: dict, field: str = "conversations") -> list:
  turns = obj.get(field)
  if turns is None:
    raise InvalidRecord("missing_field", f"missing field {field!r} (fields: {sorted(obj)})")
  if not isinstance(turns, list):
    raise InvalidRecord("wrong_type", f"field {field!r} must be a list of turns, got "
                        f"{type(turns).__name__}")
  if not turns:
    raise InvalidRecord("empty", f"field {field!r} has no turns")
  return turns


def _turn(raw: Any, index: int) -> tuple[str, str, Any]:
  """(role, content, label) of one {from, value[, label]} turn."""
  where = f"turn {index}"
  if not isinstance(raw, dict):
    raise InvalidRecord("wrong_type", f"{where} must be an object, got {type(raw).__name__}")
  role = raw.get("from", raw.get("role"))
  if role is None:
    raise InvalidRecord("missing_field", f"{where} has no 'from'")
  if role not in _ROLE_ALIASES:
    raise InvalidRecord("bad_role", f"{where}: unknown role {role!r}; expected one of "
                        f"{sorted(_ROLE_ALIASES)}")
  content = raw.get("value", raw.get("content"))
  if content is None:
    raise InvalidRecord("missing_field", f"{where} has no 'value'")
  if not isinstance(content, str):
    raise InvalidRecord("wrong_type", f"{where}: 'value' must be a string, got "
                        f"{type(content).__name__}")
  if not content.strip():
    raise InvalidRecord("empty", f"{where}: 'value' is empty")
  label = raw.get("label")
  if label is not None and label not in LABELS:
    raise InvalidRecord("bad_label", f"{where}: label must be 'chosen' or 'rejected', got "
                        f"{label!r}")
  return _ROLE_ALIASES[role], content, label


def _check_alternation(turns: list[Turn]) -> Conversation:
  """Optional system turn first, then user / assistant alternating, starting with user; an
  assistant turn may be followed by a tool turn, which the assistant's next turn follows."""
  body = turns[1:] if turns and turns[0].role == "system" else turns
  previous = None
  for i, turn in enumerate(body):
    if previous not in _FOLLOWS.get(turn.role, ()):
      want = {None: "'user'", "user": "'assistant'", "assistant": "'user' or 'tool'",
              "tool": "'assistant'"}[previous]
      raise InvalidRecord("bad_order", f"turn {i + len(turns) - len(body)} is {turn.role!r}; "
                          f"expected {want} (turns alternate user / assistant)")
    previous = turn.role
  return tuple(turns)


def check_sft_format(obj: Any, fmt: str) -> None:
  """Raises `InvalidRecord` unless `obj` is a record of `fmt` ('alpaca': has `instruction`,
  single- or multi-turn; 'sharegpt': `conversations` without `instruction`; 'auto': either)."""
  if fmt not in SFT_FORMATS:
    raise ValueError(f"config.data.format must be one of {SFT_FORMATS}, got {fmt!r}")
  if fmt == "auto" or not isinstance(obj, dict):
    return  # parse_sft reports what is wrong with a non-object
  if fmt == "alpaca" and "instruction" not in obj:
    raise InvalidRecord("wrong_format", "config.data.format is 'alpaca' but the "
                        f"record has no 'instruction' (fields: {sorted(obj)})")
  if fmt == "sharegpt" and ("conversations" not in obj or "instruction" in obj):
    raise InvalidRecord("wrong_format", "config.data.format is 'sharegpt': expected "
                        f"'conversations' and no 'instruction' (fields: {sorted(obj)})")


def parse_sft(obj: Any, fmt: str = "auto") -> Conversation:
  """An Alpaca, Alpaca multi-turn or ShareGPT record (checked against `fmt`, one of
  `SFT_FORMATS`) as a conversation ending in assistant."""
  check_sft_format(obj, fmt)
  obj = _object(obj)
  if "conversations" in obj:
    turns = []
    if "instruction" in obj:  # Alpaca multi-turn: the instruction is the system prompt
      turns.append(Turn("system", require_text(obj, "instruction")))
    for i, raw in enumerate(_turns(obj)):
      role, content, label = _turn(raw, i)
      if label is not None:
        raise InvalidRecord("bad_label", f"turn {i} has a preference label; SFT records "
                            "take unlabelled turns")
      turns.append(Turn(role, content))
    conversation = _check_alternation(turns)
  elif "instruction" in obj:
    user = require_text(obj, "instruction")
    extra = obj.get("input", "")
    if not isinstance(extra, str):
      raise InvalidRecord("wrong_type", f"field 'input' must be a string, got "
                          f"{type(extra).__name__}")
    if extra.strip():
      user = f"{user}\n\n{extra}"
    conversation = (Turn("user", user), Turn("assistant", require_text(obj, "output")))
  else:
    raise InvalidRecord("missing_field", "expected 'instruction' (Alpaca) or 'conversations' "
                        f"(ShareGPT); fields: {sorted(obj)}")
  if not any(t.role == "assistant" for t in conversation):
    raise InvalidRecord("no_assistant", "the conversation has no assistant turn to learn")
  return conversation


def _context(obj: dict) -> Conversation:
  """`prompt` as text (one user turn) or as a list of ShareGPT turns ending with user."""
  prompt = obj.get("prompt")
  if isinstance(prompt, list):
    turns = [Turn(*_turn(raw, i)[:2]) for i, raw in enumerate(_turns(obj, "prompt"))]
    context = _check_alternation(turns)
    if context[-1].role != "user":
      raise InvalidRecord("bad_order", "the prompt's last turn must be the user's")
    return context
  return (Turn("user", require_text(obj, "prompt")),)


def parse_preferences(obj: Any) -> list[PreferencePair]:
  """A {prompt, chosen, rejected[, margin]} or labelled-ShareGPT record as preference pairs.

  In a ShareGPT record, each user turn may be followed by assistant candidates labelled
  chosen / rejected; every chosen x rejected pair at a turn is one pair whose context is the
  conversation before it, continued with the first chosen answer of each earlier turn.
  """
  obj = _object(obj)
  if ("conversations" not in obj and "prompt" not in obj
      and dialogue_text.looks_like_dialogue(str(obj.get("chosen", "")))):
    return [parse_hh_pair(obj)]
  if "conversations" not in obj:
    margin = obj.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
      raise InvalidRecord("wrong_type", f"field 'margin' must be a number, got "
                          f"{type(margin).__name__}")
    chosen, rejected = require_text(obj, "chosen"), require_text(obj, "rejected")
    if _same_answer(chosen, rejected):
      raise InvalidRecord("same_answer", "'chosen' and 'rejected' are the same text (the pair "
                          "has no preference to learn)")
    return [PreferencePair(_context(obj), chosen, rejected,
                           None if margin is None else float(margin))]
  context, pairs = [], []
  # label -> [(turn index, content)] of the candidates after the current user turn.
  candidates: dict[str, list[tuple[int, str]]] = {"chosen": [], "rejected": []}

  def close_turn():
    for (i, chosen), (j, rejected) in itertools.product(candidates["chosen"],
                                                        candidates["rejected"]):
      if _same_answer(chosen, rejected):
        raise InvalidRecord("same_answer", f"turns {i} (chosen) and {j} (rejected) are the "
                            "same text (the pair has no preference to learn)")
      pairs.append(PreferencePair(tuple(context), chosen, rejected))
    if candidates["chosen"]:
      context.append(Turn("assistant", candidates["chosen"][0][1]))
    candidates["chosen"], candidates["rejected"] = [], []

  for i, raw in enumerate(_turns(obj)):
    role, content, label = _turn(raw, i)
    if role == "assistant" and label is not None:
      if not context or context[-1].role != "user":
        raise InvalidRecord("bad_order", f"turn {i}: a labelled answer must follow a user turn")
      candidates[label].append((i, content))
      continue
    close_turn()
    context.append(Turn(role, content))
  close_turn()
  if not pairs:
    raise InvalidRecord("no_pairs", "no user turn has both a chosen and a rejected answer")
  return pairs


def parse_hh_pair(obj: dict) -> PreferencePair:
  """An Anthropic HH record `{chosen, rejected}`, each a whole `\\n\\nHuman: ... \\n\\nAssistant:
  ...` dialogue: the turns both share, up to the last shared Human turn, are the context; what
  follows in each is its reply (one assistant turn's text, or the rest of the dialogue in the
  same `Human: / Assistant:` form when the two part earlier; data/dialogue_text.py)."""
  chosen_text, rejected_text = require_text(obj, "chosen"), require_text(obj, "rejected")
  try:
    chosen = dialogue_text.split_dialogue(chosen_text)
    rejected = dialogue_text.split_dialogue(rejected_text)
  except ValueError as e:
    raise InvalidRecord("bad_dialogue", str(e)) from e
  shared = dialogue_text.shared_context(chosen, rejected)
  if not shared:
    raise InvalidRecord("no_prompt", "'chosen' and 'rejected' share no dialogue up to a "
                        "Human turn")
  if any(not content for _, content in chosen[:shared]):
    raise InvalidRecord("empty", "a turn of the shared dialogue is empty")
  context = _check_alternation([Turn(role, content) for role, content in chosen[:shared]])

  def reply(turns):
    rest = turns[shared:]
    return rest[0][1] if len(rest) == 1 else dialogue_text.join_dialogue(rest)
  chosen_reply, rejected_reply = reply(chosen), reply(rejected)
  if not chosen_reply.strip() or not rejected_reply.strip():
    raise InvalidRecord("empty", "the chosen or the rejected reply is empty")
  if _same_answer(chosen_reply, rejected_reply):
    raise InvalidRecord("same_answer", "'chosen' and 'rejected' end in the same reply (the "
                        "pair has no preference to learn)")
  return PreferencePair(context, chosen_reply, rejected_reply)


def _same_answer(chosen: str, rejected: str) -> bool:
  # Equal up to surrounding whitespace: both sides then tokenize alike, so the DPO / reward
  # margin is zero by construction and the pair only dilutes the batch.
  return chosen.strip() == rejected.strip()


def parse_feedback(obj: Any) -> Feedback:
  """{prompt, completion, label: bool}: an unpaired (KTO) example."""
  obj = _object(obj)
  label = obj.get("label")
  if not isinstance(label, bool):
    raise InvalidRecord("wrong_type" if "label" in obj else "missing_field",
                        f"field 'label' must be true or false, got {label!r}")
  return Feedback(_context(obj), require_text(obj, "completion"), label)


def parse_prompt(obj: Any) -> Prompt:
  """{prompt[, answer]}: a prompt for RL or synthesis; GSM8K's {question, answer} too (its
  answer, the worked solution ending in `#### N`, is kept whole for the math checker)."""
  obj = _object(obj)
  if "prompt" not in obj and "question" in obj:
    obj = {**obj, "prompt": obj["question"]}
  answer = obj.get("answer")
  if answer is not None and not isinstance(answer, (str, int, float)):
    raise InvalidRecord("wrong_type", f"field 'answer' must be a string, got "
                        f"{type(answer).__name__}")
  return Prompt(_context(obj), None if answer is None else str(answer))


PARSERS = {"sft": parse_sft, "preferences": parse_preferences, "feedback": parse_feedback,
           "prompts": parse_prompt}


def read_records(patterns: str, kind: str, *, skip_invalid: bool = False,
                 counter: SkipCounter | None = None) -> Iterator[Any]:
  """Parsed records of `kind` ('sft' | 'preferences' | 'feedback' | 'prompts') from JSONL files.

  Preference records yield one `PreferencePair` per pair (a record can hold several).
  """
  if kind not in PARSERS:
    raise ValueError(f"unknown record kind {kind!r}; choose one of {sorted(PARSERS)}")
  for record in iter_jsonl_records(patterns, PARSERS[kind], skip_invalid=skip_invalid,
                                   counter=counter):
    if kind == "preferences":
      yield from record
    else:
      yield record

r"""Chat with a trained run in the terminal: multi-turn, rendered with its chat template.

  python -m scripts.chat --workdir runs/sft_tiny [--chat_template default|chatml \
      --system "You answer briefly." --max_new_tokens 64 --temperature 0.7 --top_p 0.9]

Each line typed is a user turn; the reply is generated from the whole conversation so far
(system prompt, earlier turns and replies) and printed. `/reset` starts a new conversation;
an empty line or end of input quits. When the conversation outgrows the model's context
(`config.model.max_length` minus `--max_new_tokens`) its oldest exchanges are dropped (the
system prompt is kept).

With `--tools tiny_world` (a toolset of data/tools.py: the tiny world's lookup and calc) the
model may answer with a call block, `<tool>lookup: salt, price</tool>`: the environment runs
it and appends the result as a tool turn (data/chat_template.py), and the model goes on, up to
`--max_turns` replies per user turn. Calls and results are printed as they happen:

  python -m scripts.chat --workdir runs/grpo_tools_tiny --tools tiny_world
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TextIO

import jax
from absl import app, flags, logging

from configs.cli import parse_flags
from data.conversation import Prompt, Turn
from data.tools import ToolEnvironment, get_toolset
from models.sampler import Sampler
from scripts.generate import (FLAGS, completion_text, define_sampling_flags, load_decoder,
                              prompt_tokens, stop_tokens)
from training.runs import LoadedModel


class ChatSession:
  """One conversation with a model; `reply(user_text)` returns the assistant's answer."""

  def __init__(self, model: LoadedModel, *, template: str = "default", system: str = "",
               max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, tools: str = "", max_turns: int = 4):
    """`tools`: a toolset of data/tools.py ('' = none) whose calls the session runs, at
    most `max_turns` model replies per user turn."""
    if template == "none":
      raise ValueError("chat needs a chat template: 'default' or 'chatml'")
    if max_turns < 1:
      raise ValueError(f"--max_turns must be >= 1, got {max_turns}")
    self.env = ToolEnvironment(get_toolset(tools, "--tools")) if tools else None
    self.max_turns = max_turns
    # The calls and results of the last user turn: (call reply, result text) each.
    self.steps: list[tuple[str, str]] = []
    self.model = model
    self.template = template
    self.system = system
    self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p)
    self.stops = stop_tokens(model.tokenizer, template)
    self.sampler = Sampler(model.spec, model.mesh, model.rules)
    self.seed = seed
    self.replies = 0
    self.turns: list = []
    self.reset()

  def reset(self) -> None:
    self.turns = [Turn("system", self.system)] if self.system else []

  def _prompt(self) -> list[int]:
    """The rendered conversation; its oldest exchanges dropped until prompt + reply fit."""
    limit = self.model.config.model.max_length - self.settings["max_new_tokens"]
    add_bos = bool(self.model.config.data.get("add_bos", True))
    while True:
      ids = prompt_tokens(self.model.tokenizer, tuple(self.turns), self.template, add_bos)
      first = 1 if self.turns[0].role == "system" else 0
      current = max(i for i, t in enumerate(self.turns) if t.role == "user")
      if len(ids) <= limit or first >= current:
        break
      # The oldest exchange: its user turn and what followed up to the next one.
      following = next(i for i in range(first + 1, len(self.turns))
                       if self.turns[i].role == "user")
      del self.turns[first:following]
    if len(ids) > limit:
      raise ValueError(f"the message alone is {len(ids)} tokens; the model's context allows "
                       f"{limit} with --max_new_tokens {self.settings['max_new_tokens']}")
    return ids

  def reply(self, user_text: str) -> str:
    """The answer to `user_text`; with tools, the reply after the calls (`self.steps`), or
    the last call when `max_turns` replies were all calls."""
    self.turns.append(Turn("user", user_text))
    self.steps = []
    if self.env is None:
      return self._generate()
    self.env.reset(Prompt(tuple(self.turns)))
    for _ in range(self.max_turns - 1):
      text = self._generate()
      result = self.env.step(text)
      if result.done:
        return text
      self.steps.append((text, result.observation))
      self.turns.append(Turn("tool", result.observation))
    return self._generate()  # the last reply allowed: its call, if any, is not run

  def _generate(self) -> str:
    """One assistant reply to the conversation so far, appended to it."""
    model = self.model
    result = self.sampler.generate(
        model.params, [self._prompt()], eos_id=model.tokenizer.eos_id,
        pad_id=model.tokenizer.pad_id, stop_ids=self.stops,
        rng=jax.random.fold_in(jax.random.PRNGKey(self.seed), self.replies), **self.settings)
    self.replies += 1
    tokens = result.tokens[0, :result.lengths[0]].tolist()
    text = completion_text(model.tokenizer, tokens, self.stops)
    self.turns.append(Turn("assistant", text))
    return text


def chat(session: ChatSession, user_turns: Iterable[str]) -> Iterator[str]:
  """The replies to `user_turns`, one by one (`/reset` starts over and yields nothing)."""
  for text in user_turns:
    if text.strip() == "/reset":
      session.reset()
      continue
    yield session.reply(text)


def _stdin_turns(stream: TextIO, out: TextIO) -> Iterator[str]:
  while True:
    out.write("you> ")
    out.flush()
    line = stream.readline()
    if not line.strip():
      return
    yield line.rstrip("\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  session = ChatSession(load_decoder(FLAGS.workdir), template=FLAGS.chat_template,
                        system=FLAGS.system, max_new_tokens=FLAGS.max_new_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        seed=FLAGS.seed, tools=FLAGS.tools, max_turns=FLAGS.max_turns)
  for reply in chat(session, _stdin_turns(sys.stdin, sys.stdout)):
    for call, result in session.steps:
      print(f"assistant> {call}\ntool> {result}", flush=True)
    print(f"assistant> {reply}", flush=True)


if __name__ == "__main__":
  define_sampling_flags(default_template="default")
  flags.DEFINE_string("system", "", "System prompt of the conversation ('' : none).")
  flags.DEFINE_string("tools", "", "Toolset whose calls are run (data/tools.py: tiny_world; "
                      "'' : none).")
  flags.DEFINE_integer("max_turns", 4, "With --tools: model replies per user turn at most.")
  # The shared flags belong to scripts.generate; list them in this script's --help too.
  flags.adopt_module_key_flags(sys.modules[define_sampling_flags.__module__])
  app.run(main, flags_parser=parse_flags)

"""Tools for multi-turn episodes, and the environment that runs a model's calls to them.

The call syntax is the chat template's (data/chat_template.py): the model writes
`<tool>name: arguments</tool>` in an assistant turn, the environment answers with a tool turn
rendered as `<result>text</result>`. A toolset maps tool names to functions
`tool(argument_text) -> result text` that raise `ToolError` on bad arguments.

The `tiny_world` toolset (`TOOLSETS`), over the facts of data/world.py:

  lookup: name          every fact about a town, a good or a person: `lookup: salt` ->
                        "Salt comes from Brackwater. A sack of salt costs 4 coins. A
                        saltmaker makes salt. Salt is sold by the sack."
  lookup: name, field   one fact (`LOOKUP_FIELDS`): `lookup: salt, price` -> "A sack of salt
                        costs 4 coins."; `lookup: Ashford, mayor` -> "The mayor of Ashford is
                        Bran."; two towns, `lookup: Ashford, Dunmere`, give the road between
                        them. Names and fields are matched case aside.
  calc: expression      exact arithmetic: numbers (integer or decimal), + - * / (also x for
                        times), parentheses and unary minus, parsed by a small recursive-
                        descent parser (no eval): `calc: 9 * 4` -> "9 * 4 = 36", `calc: 7 / 2`
                        -> "7 / 2 = 3.5". Results are exact fractions shown as integers, or as
                        decimals of at most 6 places. The tool echoes the expression so the
                        value stands as a word of its own, tokenized as it is in a sentence
                        ("36" straight after `<result>` is another SentencePiece piece than
                        the "▁36" an answer writes), which a model copies far more readily.

The environment (`Environment`, `ToolEnvironment`), text in and text out:

  reset(prompt) -> the first observation: the prompt's context (the turns the model sees)
  step(reply)   -> StepResult(observation, reward, done)
                   a reply with a call: observation = the tool's result text (or `error: ...`
                   for a malformed call, an unknown tool or bad arguments: the episode goes
                   on and the model may call again), reward 0, not done;
                   a reply without a call is the final answer: observation None, reward =
                   the environment's reward function on it (0 without one), done.

Token budgets and the cap on turns belong to the episode loop (training/rl/episodes.py),
which renders observations with `chat_template.tool_result_tokens`.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
from typing import Callable, Mapping, Protocol

from data import chat_template
from data.conversation import Conversation, Prompt
from data.world import World, _a, build_world

Tool = Callable[[str], str]
RewardFn = Callable[[str, Prompt], float]


class ToolError(ValueError):
  """A tool's arguments are wrong; its message becomes the observation `error: ...`."""


# --- calc -----------------------------------------------------------------------------------

_MAX_EXPRESSION = 200     # characters
_MAX_DEPTH = 32           # nested parentheses / unary signs
_MAX_MAGNITUDE = 10 ** 15
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(\S))")


class _Parser:
  """expr := term (('+' | '-') term)* ; term := factor (('*' | 'x' | '/') factor)* ;
  factor := ('-' | '+') factor | number | '(' expr ')'."""

  def __init__(self, text: str):
    self.tokens, position = [], 0
    while position < len(text):
      match = _TOKEN.match(text, position)
      if match is None:  # only trailing whitespace is left
        break
      self.tokens.append(match[1] if match[1] is not None else match[2])
      position = match.end()
    self.index = 0

  def peek(self) -> str | None:
    return self.tokens[self.index] if self.index < len(self.tokens) else None

  def take(self) -> str | None:
    token = self.peek()
    self.index += 1
    return token

  def expression(self, depth: int) -> fractions.Fraction:
    value = self.term(depth)
    while self.peek() in ("+", "-"):
      value = value + self.term(depth) if self.take() == "+" else value - self.term(depth)
    return _bounded(value)

  def term(self, depth: int) -> fractions.Fraction:
    value = self.factor(depth)
    while self.peek() in ("*", "x", "/"):
      op, right = self.take(), self.factor(depth)
      if op == "/":
        if right == 0:
          raise ToolError("division by zero")
        value = value / right
      else:
        value = value * right
      value = _bounded(value)
    return value

  def factor(self, depth: int) -> fractions.Fraction:
    if depth > _MAX_DEPTH:
      raise ToolError(f"nested more than {_MAX_DEPTH} deep")
    token = self.take()
    if token in ("-", "+"):
      value = self.factor(depth + 1)
      return -value if token == "-" else value
    if token == "(":
      value = self.expression(depth + 1)
      if self.take() != ")":
        raise ToolError("a '(' is not closed")
      return value
    if token is None:
      raise ToolError("the expression ends too early")
    if not token[0].isdigit():
      raise ToolError(f"unexpected {token!r}")
    return fractions.Fraction(token)


def _bounded(value: fractions.Fraction) -> fractions.Fraction:
  if abs(value) >= _MAX_MAGNITUDE:
    raise ToolError(f"a result beyond {_MAX_MAGNITUDE:.0e}")
  return value


def format_number(value: fractions.Fraction) -> str:
  """An integer as such, else a decimal rounded to 6 places without trailing zeros."""
  if value.denominator == 1:
    return str(value.numerator)
  return f"{float(value):.6f}".rstrip("0").rstrip(".")


def calculate(expression: str) -> str:
  """The value of an arithmetic `expression` (module docstring), as text.

  Raises:
    ToolError: an empty, over-long or malformed expression, division by zero, or a value
      of 1e15 or more.
  """
  if not expression.strip():
    raise ToolError("calc needs an expression, e.g. calc: 9 * 4")
  if len(expression) > _MAX_EXPRESSION:
    raise ToolError(f"an expression of more than {_MAX_EXPRESSION} characters")
  parser = _Parser(expression)
  value = parser.expression(0)
  if parser.peek() is not None:
    raise ToolError(f"unexpected {parser.peek()!r}")
  return format_number(value)


def calc_tool(expression: str) -> str:
  """The `calc` tool: `"EXPRESSION = VALUE"` (module docstring), e.g. "9 * 4 = 36"."""
  return f"{' '.join(expression.split())} = {calculate(expression)}"


# --- lookup ---------------------------------------------------------------------------------

# Fields of `lookup: name, field` by kind of name; aliases map to the same fact.
LOOKUP_FIELDS = {
    "town": {"region": "region", "export": "export", "exports": "export", "makes": "export",
             "imports": "imports", "buys": "imports", "market": "market", "market day": "market",
             "landmark": "landmark", "population": "population", "people": "population",
             "mayor": "mayor", "roads": "roads"},
    "good": {"price": "price", "cost": "price", "maker": "maker", "town": "maker",
             "trade": "trade", "unit": "unit"},
    "person": {"town": "town", "home": "town", "trade": "trade", "makes": "makes",
               "age": "age", "sibling": "sibling"},
}


def _town_facts(w: World, name: str) -> dict[str, str]:
  t = w.town(name)
  roads = ", ".join(f"{other} {miles} miles" for other, miles in w.neighbours(name))
  return {"region": f"{name} is {'on' if t.region == 'the coast' else 'in'} {t.region}.",
          "export": f"{name} makes {t.export}.",
          "imports": f"{name} buys {' and '.join(t.imports)}.",
          "market": f"The market of {name} is on {t.market_day}.",
          "landmark": f"{name} has {_a(t.landmark)}.",
          "population": f"{name} has {t.population} people.",
          "mayor": f"The mayor of {name} is {t.mayor}.",
          "roads": f"Roads from {name}: {roads}."}


def _good_facts(w: World, name: str) -> dict[str, str]:
  g = w.good(name)
  return {"maker": f"{name.capitalize()} comes from {w.maker_of(name).name}.",
          "price": f"A {g.unit} of {name} costs {g.price} coins.",
          "trade": f"A {g.trade} makes {name}.",
          "unit": f"{name.capitalize()} is sold by the {g.unit}."}


def _person_facts(w: World, name: str) -> dict[str, str]:
  p = w.person(name)
  sibling = (f"{name} has a sibling, {p.sibling}, in {w.person(p.sibling).town}."
             if p.sibling else f"{name} has no sibling.")
  return {"town": f"{name} lives in {p.town}.", "trade": f"{name} is a {p.trade}.",
          "makes": f"{name} makes {w.trade_good(p.trade).name}.",
          "age": f"{name} is {p.age} years old.", "sibling": sibling}


class Lookup:
  """The `lookup` tool over one world (module docstring)."""

  def __init__(self, world: World):
    self.world = world
    self.kinds: dict[str, tuple[str, str]] = {}  # lower-case name -> (kind, name)
    for kind, names in (("town", [t.name for t in world.towns]),
                        ("good", [g.name for g in world.goods]),
                        ("person", [p.name for p in world.people])):
      self.kinds.update({n.lower(): (kind, n) for n in names})

  def __call__(self, arguments: str) -> str:
    parts = [part.strip() for part in arguments.split(",")]
    if not parts[0] or len(parts) > 2 or not all(parts):
      raise ToolError("lookup takes a name and optionally a field, e.g. lookup: salt, price")
    kind, name = self._entity(parts[0])
    facts = {"town": _town_facts, "good": _good_facts, "person": _person_facts}[kind](
        self.world, name)
    if len(parts) == 1:
      return " ".join(facts.values())
    field = " ".join(parts[1].lower().split())
    if kind == "town" and self.kinds.get(field, ("",))[0] == "town":
      return self._road(name, self.kinds[field][1])
    if field not in LOOKUP_FIELDS[kind]:
      raise ToolError(f"a {kind} has no field {parts[1]!r}; fields: "
                      f"{', '.join(sorted(set(LOOKUP_FIELDS[kind].values())))}"
                      + (", or another town" if kind == "town" else ""))
    return facts[LOOKUP_FIELDS[kind][field]]

  def _entity(self, text: str) -> tuple[str, str]:
    found = self.kinds.get(text.lower())
    if found is None:
      raise ToolError(f"no town, good or person called {text!r}")
    return found

  def _road(self, a: str, b: str) -> str:
    miles = dict(self.world.neighbours(a)).get(b)
    if miles is None:
      return f"No road joins {a} and {b}."
    return f"It is {miles} miles from {a} to {b}."


def tiny_world_tools() -> dict[str, Tool]:
  """The `tiny_world` toolset: lookup over data/world.py's world, and calc."""
  return {"lookup": Lookup(build_world()), "calc": calc_tool}


TOOLSETS: dict[str, Callable[[], dict[str, Tool]]] = {"tiny_world": tiny_world_tools}


def get_toolset(name: str, key: str = "config.rl.tools") -> dict[str, Tool]:
  """The tools of toolset `name` (one of TOOLSETS)."""
  if name not in TOOLSETS:
    raise ValueError(f"{key}: unknown toolset {name!r}; choose one of {sorted(TOOLSETS)}")
  return TOOLSETS[name]()


# --- The environment ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepResult:
  observation: str | None   # the tool's result text (rendered as a tool turn); None when done
  reward: float
  done: bool


class Environment(Protocol):
  """A multi-turn environment driven by the model's replies (module docstring)."""

  def reset(self, prompt: Prompt) -> Conversation:
    ...

  def step(self, reply: str) -> StepResult:
    ...


def run_tool_call(tools: Mapping[str, Tool], call: chat_template.ToolCall) -> str:
  """The result text of `call`, or `error: ...` (unknown tool, bad arguments)."""
  tool = tools.get(call.name)
  if tool is None:
    return f"error: no tool {call.name!r}; tools: {', '.join(sorted(tools))}"
  try:
    return tool(call.arguments)
  except ToolError as e:
    return f"error: {e}"


class ToolEnvironment:
  """Executes the calls of one episode's replies (module docstring)."""

  def __init__(self, tools: Mapping[str, Tool], reward_fn: RewardFn | None = None):
    self.tools, self.reward_fn = dict(tools), reward_fn
    self.prompt: Prompt | None = None

  def reset(self, prompt: Prompt) -> Conversation:
    self.prompt = prompt
    return prompt.context

  def step(self, reply: str) -> StepResult:
    if self.prompt is None:
      raise RuntimeError("step() before reset()")
    try:
      call = chat_template.parse_tool_call(reply)
    except chat_template.ToolCallError as e:
      return StepResult(f"error: {e}", 0.0, False)
    if call is not None:
      return StepResult(run_tool_call(self.tools, call), 0.0, False)
    reward = 0.0 if self.reward_fn is None else float(self.reward_fn(reply, self.prompt))
    return StepResult(None, reward, True)

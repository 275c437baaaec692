"""Math answers: the final number of a solution, compared by value (data/verifiers.py's `math`
answer checker, for GSM8K-style rewards and task evaluation).

The final answer of a text is, in order of preference:

  1. what follows the last `#### ` (GSM8K's reference solutions, and replies trained on them)
  2. the content of the last `\\boxed{...}` (MATH and most instruction-tuned models)
  3. the last number in the text

Two answers are equal when both parse as numbers of the same value: thousands commas,
currency signs (`$`, `\\$`), percent signs, units and words after the number, LaTeX
`\\text{...}`, and trailing periods are ignored, and fractions equal their decimals
(`\\frac{3}{4}`, `3/4` and `0.75` are one value; `1,000`, `$1000.00` and `1000 dollars`
another). Otherwise they are compared as lower-cased words. GSM8K's answers are integers, so
value equality is what its published accuracies count (Cobbe et al., 2021).
"""

from __future__ import annotations

import fractions
import re

# A number: thousands-grouped or plain digits, optional decimals, optional `/denominator`;
# not glued to a preceding word ("x2", "COVID-19" gives 19, not -19).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
                     r"(?:/(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?)?"
                     r"|(?<![\w.])-?\.\d+")
_HASHES = re.compile(r"####\s*([^\n]*)")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_NOISE = re.compile(r"\\[$%,!;: ]|\\left|\\right|\^\s*\{?\\circ\}?|°|\$")
_NON_WORD = re.compile(r"[^a-z0-9./-]+")


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if
  there is none or it is not closed."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  brace = text.find("{", start)
  if brace < 0:
    return None
  depth = 0
  for i in range(brace, len(text)):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[brace + 1:i]
  return None


def final_answer(text: str) -> str:
  """The final answer's text: after the last `####`, else the last `\\boxed{}`, else the
  last number, else the whole text (stripped)."""
  hashes = _HASHES.findall(text)
  if hashes and hashes[-1].strip():
    return hashes[-1].strip()
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  numbers = _NUMBER.findall(_clean(text))
  return numbers[-1] if numbers else text.strip()


def _clean(text: str) -> str:
  """LaTeX fractions as a/b, `\\text{...}` units, currency and degree signs removed; the
  unicode minus as '-'."""
  text = _FRAC.sub(r"(\1)/(\2)", text.replace("\u2212", "-"))
  text = _TEXT.sub(" ", text)
  text = _LATEX_NOISE.sub("", text).replace("%", "")
  # "(3)/(4)" from \frac{3}{4}: parentheses around plain numbers only.
  return re.sub(r"\((-?[\d.,]+)\)", r"\1", text)


def to_fraction(number: str) -> fractions.Fraction | None:
  """`'1,234.50'` -> 2469/2, `'3/4'` -> 3/4; None for a zero denominator."""
  numerator, _, denominator = number.replace(",", "").partition("/")
  value = fractions.Fraction(numerator)
  if denominator:
    if fractions.Fraction(denominator) == 0:
      return None
    value /= fractions.Fraction(denominator)
  return value


def answer_value(answer: str) -> fractions.Fraction | None:
  """The number a final answer states: its first number ('18 dollars.' -> 18, 'x = 3' -> 3),
  or None when it holds none."""
  match = _NUMBER.search(_clean(answer))
  return None if match is None else to_fraction(match.group())


def _words(text: str) -> str:
  text = _clean(_TEXT.sub(r"\1", text))  # a word answer's \text{} is the answer itself
  return " ".join(_NON_WORD.sub(" ", text.lower()).split()).strip(".")


def math_answer_match(reply: str, answer: str) -> bool:
  """Whether `reply`'s final answer equals `answer`'s (a reference solution ending in
  `#### N`, a `\\boxed{}` one, or a bare answer), by value when both are numbers."""
  predicted, reference = final_answer(reply), final_answer(answer)
  ref_value = answer_value(reference)
  if ref_value is not None:
    value = answer_value(predicted)
    return value is not None and value == ref_value
  return bool(_words(reference)) and _words(predicted) == _words(reference)

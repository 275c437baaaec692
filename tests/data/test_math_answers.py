"""The math answer checker on tricky answers: where the final answer is found, and which
spellings of a number count as the same value."""

import fractions

import pytest

from data.math_answers import answer_value, final_answer, last_boxed, math_answer_match
from data.verifiers import get_answer_checker, get_reward_function
from data.conversation import Prompt, Turn

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
                  "#### 72")


@pytest.mark.parametrize("text, want", [
    (GSM8K_SOLUTION, "72"),
    ("so she has 5 left.\n#### 1,080\n", "1,080"),
    ("The area is \\boxed{\\frac{3}{4}} square units, not 7.", "\\frac{3}{4}"),
    ("first \\boxed{2}, corrected: \\boxed{{4}}", "{4}"),
    ("She pays 12 dollars, then 3 more, so 15.", "15"),
    ("no digits here", "no digits here"),
])
def test_final_answer_prefers_hashes_then_boxed_then_last_number(text, want):
  assert final_answer(text) == want


@pytest.mark.parametrize("reply, answer", [
    ("Natalia sold 72 clips.", GSM8K_SOLUTION),
    ("#### 72", "72"),
    ("The total is $1,000.", "1000"),
    ("It costs \\boxed{\\$18.00}", "18"),
    ("So the answer is 0.75", "\\boxed{\\frac{3}{4}}"),
    ("3/4 of the cake", "0.75"),
    ("He ends with −3 degrees", "-3"),
    ("The discount is 25%.", "25"),
    ("That makes 5 apples.", "#### 5 apples"),
    ("\\boxed{\\text{Tuesday}}", "tuesday"),
    ("The answer: 1,234,567", "1234567.0"),
])
def test_same_values_match(reply, answer):
  assert math_answer_match(reply, answer)


@pytest.mark.parametrize("reply, answer", [
    ("Natalia sold 24 clips in May and 72 in all, so 96.", GSM8K_SOLUTION),
    ("#### 7.2", "72"),
    ("1,2", "12"),                  # a list, not a thousands separator
    ("COVID-19 cases: none", "-19"),
    ("I cannot tell.", "42"),
    ("\\boxed{2/0}", "0"),
    ("Monday", "tuesday"),
])
def test_different_values_do_not(reply, answer):
  assert not math_answer_match(reply, answer)


def test_values_and_boxes():
  assert answer_value("$1,234.50 in total.") == fractions.Fraction(2469, 2)
  assert answer_value("\\dfrac{1}{8}") == fractions.Fraction(1, 8)
  assert answer_value("none") is None
  assert last_boxed("\\boxed{1 + {2}") is None  # unclosed


def test_registered_as_checker_and_answer_reward():
  checker = get_answer_checker("math")
  reward = get_reward_function("answer", checker)
  prompt = Prompt((Turn("user", "How many clips?"),), GSM8K_SOLUTION)
  assert reward("... so 72 in all.", prompt) == 1.0 and reward("70", prompt) == 0.0

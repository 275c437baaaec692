"""Chat templates: tokens and loss mask checked token by token."""

import numpy as np
import pytest

from data.chat_template import render, render_completion, render_prompt, stop_ids
from data.conversation import Turn

CONV = (Turn("system", "Be brief."), Turn("user", "Where is salt made?"),
        Turn("assistant", "In Ashford."), Turn("user", "And copper?"),
        Turn("assistant", "Dunmere."))


def sym(tok, piece):
  return tok.token_to_id(piece)


def test_default_template_tokens_and_mask(tiny_tokenizer):
  tok = tiny_tokenizer
  out = render(tok, CONV, "default")
  eot = sym(tok, "<|end_of_turn|>")
  expected, mask = [tok.bos_id], [0]
  for turn in CONV:
    body = tok.encode(turn.content) + [eot]
    expected += [sym(tok, f"<|{turn.role}|>")] + body
    mask += [0] + [int(turn.role == "assistant")] * len(body)
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.loss_mask, mask)
  # Exactly the two answers and their end-of-turn tokens are supervised.
  assert out.loss_mask.sum() == len(tok.encode("In Ashford.")) + len(tok.encode("Dunmere.")) + 2
  supervised = [t for t, m in zip(out.tokens, out.loss_mask) if m]
  assert supervised == tok.encode("In Ashford.") + [eot] + tok.encode("Dunmere.") + [eot]


def test_last_turn_only(tiny_tokenizer):
  out = render(tiny_tokenizer, CONV, "default", supervise="last")
  supervised = [t for t, m in zip(out.tokens, out.loss_mask) if m]
  assert supervised == tiny_tokenizer.encode("Dunmere.") + [sym(tiny_tokenizer,
                                                                "<|end_of_turn|>")]


def test_chatml_layout(tiny_tokenizer):
  tok = tiny_tokenizer
  out = render(tok, CONV[1:3], "chatml")
  start, end, nl = sym(tok, "<|im_start|>"), sym(tok, "<|im_end|>"), tok.encode("\n")
  user = [start] + tok.encode("user\n") + tok.encode("Where is salt made?") + [end] + nl
  answer = tok.encode("In Ashford.") + [end]
  assistant = [start] + tok.encode("assistant\n") + answer + nl
  np.testing.assert_array_equal(out.tokens, [tok.bos_id] + user + assistant)
  mask = [0] * (1 + len(user) + 1 + len(tok.encode("assistant\n"))) + [1] * len(answer) + \
      [0] * len(nl)
  np.testing.assert_array_equal(out.loss_mask, mask)
  assert stop_ids(tok, "chatml") == [end, tok.eos_id]


@pytest.mark.parametrize("template", ["default", "chatml"])
def test_prompt_is_a_prefix_of_the_conversation(tiny_tokenizer, template):
  full = render(tiny_tokenizer, CONV[:3], template).tokens.tolist()
  prompt = render_prompt(tiny_tokenizer, CONV[:2], template)
  completion = render_completion(tiny_tokenizer, "In Ashford.", template)
  assert full[:len(prompt) + len(completion)] == prompt + completion


def test_unknown_template(tiny_tokenizer):
  with pytest.raises(ValueError, match="unknown chat template"):
    render(tiny_tokenizer, CONV, "llama9")

"""Shared fixtures: one small tokenizer trained on the tiny world, once per test session."""

import pytest

from data import tiny_world
from data import tokenizer

TEST_VOCAB_SIZE = 384  # 266 specials, chat symbols and bytes, plus 118 learned pieces


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
  docs = tiny_world.generate_documents("train", 1500)
  prefix = tmp_path_factory.mktemp("tokenizer") / "spm"
  return tokenizer.train_sentencepiece(docs, str(prefix), TEST_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path) -> tokenizer.Tokenizer:
  return tokenizer.Tokenizer.load(tiny_tokenizer_path)

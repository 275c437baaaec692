"""SentencePiece training and the Tokenizer wrapper: special ids, round trips, determinism."""

import pickle

import pytest

from data import tiny_world
from data import tokenizer
from tests.data.conftest import TEST_VOCAB_SIZE


def test_special_ids(tiny_tokenizer):
  tok = tiny_tokenizer
  assert tok.vocab_size == TEST_VOCAB_SIZE
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert [tok.token_to_id(s) for s in tokenizer.CHAT_SYMBOLS] == [4, 5, 6, 7, 8, 9]
  assert tok.token_to_id("<no such piece>") == tok.unk_id


def test_chat_symbols_are_single_tokens(tiny_tokenizer):
  tok = tiny_tokenizer
  for i, symbol in enumerate(tokenizer.CHAT_SYMBOLS, start=4):
    ids = tok.encode(f"{symbol}user\nHello{symbol}")
    assert ids.count(i) == 2
    assert tok.decode([i]) == symbol
    assert tok.decode(ids) == f"{symbol}user\nHello{symbol}"


def test_round_trip(tiny_tokenizer):
  tok = tiny_tokenizer
  docs = tiny_world.generate_documents("validation", 50)
  # Unseen characters go through byte fallback; whitespace is kept exactly.
  docs += ["Zürich 東京 naïve — ok", "two  spaces\tand a tab\nand a newline", "x"]
  for doc in docs:
    ids = tok.encode(doc)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == doc
  assert tok.decode_batch(tok.encode_batch(docs)) == docs
  assert tok.encode_batch(docs[:3], add_eos=True) == [
      tok.encode(d, add_eos=True) for d in docs[:3]]


def test_bos_eos_and_padding(tiny_tokenizer):
  tok = tiny_tokenizer
  ids = tok.encode("Ashford lies in the hills.", add_bos=True, add_eos=True)
  assert ids[0] == 2 and ids[-1] == 3
  assert tok.decode([0, 0] + ids + [0, 0, 0]) == "Ashford lies in the hills."
  # A learned piece: common words of the corpus are whole tokens.
  assert tok.encode("the") == [tok.token_to_id("▁the")]


def test_pickle(tiny_tokenizer):
  clone = pickle.loads(pickle.dumps(tiny_tokenizer))
  assert clone.vocab_size == TEST_VOCAB_SIZE
  assert clone.encode("Greywick makes copper.") == tiny_tokenizer.encode(
      "Greywick makes copper.")


def test_training_is_deterministic(tmp_path, tiny_tokenizer_path):
  docs = tiny_world.generate_documents("train", 1500)
  again = tokenizer.train_sentencepiece(docs, str(tmp_path / "again" / "spm"), TEST_VOCAB_SIZE)
  assert again == str(tmp_path / "again" / "spm.model")
  with open(again, "rb") as a, open(tiny_tokenizer_path, "rb") as b:
    assert a.read() == b.read()
  assert (tmp_path / "again" / "spm.vocab").read_text().splitlines()[4] == "<|im_start|>\t0.0"


def test_sampled_training_depends_on_seed(tmp_path):
  docs = tiny_world.generate_documents("train", 600)
  paths = [tokenizer.train_sentencepiece(docs, str(tmp_path / f"s{seed}_{i}"), 352,
                                         seed=seed, max_sentences=200)
           for i, seed in enumerate((1, 1, 2))]
  models = [open(p, "rb").read() for p in paths]
  assert models[0] == models[1]
  assert models[0] != models[2]


def test_unigram_model(tmp_path):
  docs = tiny_world.generate_documents("train", 600)
  tok = tokenizer.Tokenizer.load(tokenizer.train_sentencepiece(
      docs, str(tmp_path / "uni"), 352, model_type="unigram"))
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.token_to_id("<|end_of_turn|>")) == (
      352, 0, 3, 9)
  assert tok.decode(tok.encode(docs[0])) == docs[0]


def test_bad_model_type(tmp_path):
  with pytest.raises(ValueError, match="model_type"):
    tokenizer.train_sentencepiece(["a b c"], str(tmp_path / "x"), 300, model_type="wordpiece")

"""SentencePiece tokenizer: training from in-memory text, and a small typed wrapper.

Every model trained here has the same special ids, so configs, packing and chat templates
never ask a tokenizer what they are: pad=0, unk=1, bos=2, eos=3, then the chat symbols in
`CHAT_SYMBOLS` (ids 4-9), each always a single token. Byte fallback is on, so any text
encodes (an unseen character becomes its UTF-8 bytes), and normalization is off
(`identity`, extra whitespace kept), so `decode(encode(text)) == text`. As usual for
SentencePiece, `encode` treats the start of a text as the start of a word (a leading "▁"
piece before a symbol); a chat template that needs a bare symbol takes `token_to_id`.
"""

import io
import os
import random
from typing import Iterable, Iterator

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_SYMBOLS = ("<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|end_of_turn|>")
# SentencePiece skips longer "sentences" when training; a document is one sentence here.
_MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer:
  """A SentencePiece model with the special ids above; picklable (grain worker processes)."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def __getstate__(self) -> bytes:
    return self._proto

  def __setstate__(self, proto: bytes) -> None:
    self.__init__(proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list:
    """Token ids of `text`, optionally framed by BOS / EOS."""
    return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: list, add_bos: bool = False, add_eos: bool = False) -> list:
    return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids) -> str:
    """Text of `ids`; padding is dropped (BOS / EOS / pad decode to nothing)."""
    return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

  def decode_batch(self, batch) -> list:
    return [self.decode(ids) for ids in batch]

  def token_to_id(self, piece: str) -> int:
    """Id of `piece`; the unk id when the vocabulary has no such piece."""
    return self._sp.piece_to_id(piece)

  def id_to_token(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe", seed: int = 0, num_threads: int = 2,
                        character_coverage: float = 1.0, max_sentences: int = 0) -> str:
  """Trains a SentencePiece model on `texts` and writes `{model_prefix}.model` / `.vocab`.

  The same texts, arguments and seed give a byte-identical model.

  Args:
    texts: documents; each is one training sentence (newlines split it further).
    model_prefix: output path without extension (`.model` and a readable `.vocab` are
      written); its directory is created.
    vocab_size: the full vocabulary: 4 specials, 6 chat symbols and 256 byte pieces (byte
      fallback), one piece per distinct character, then learned merges; English text
      needs at least ~340.
    model_type: 'bpe' or 'unigram'.
    seed: seeds the sample of `max_sentences` sentences.
    num_threads: trainer threads; kept small because the machines it runs on are shared.
    character_coverage: share of characters given their own piece; lower it (0.9995) for
      text with many rare characters (CJK) so they fall back to bytes instead of filling
      the vocabulary.
    max_sentences: train on a uniform sample of this many sentences (0: all), drawn
      here rather than by SentencePiece, whose sampling ignores any seed.

  Returns:
    The path of the .model file.
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  sentences = _sentences(texts)
  if max_sentences > 0:
    sentences = iter(_reservoir_sample(sentences, max_sentences, seed))
  # Trained into memory: a model written by the trainer records its output path, so the
  # same data trained into two places would differ by that string.
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences,
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(CHAT_SYMBOLS),
      byte_fallback=True,
      character_coverage=character_coverage,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      # One digit per token: sums and prices tokenize consistently (as in LLaMA).
      split_digits=True,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      num_threads=num_threads,
      minloglevel=2,
  )
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(len(sp)))
  _write_atomic(model_prefix + ".vocab", vocab.encode("utf-8"))
  _write_atomic(model_prefix + ".model", model.getvalue())
  return model_prefix + ".model"


def _sentences(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.split("\n"):
      if line.strip():
        yield line


def _reservoir_sample(items: Iterable[str], k: int, seed: int) -> list:
  """A uniform sample of `k` items in one pass, memory O(k) (Vitter's algorithm R)."""
  rng = random.Random(seed)
  sample = []
  for i, item in enumerate(items):
    if i < k:
      sample.append(item)
    else:
      j = rng.randrange(i + 1)
      if j < k:
        sample[j] = item
  return sample


def _write_atomic(path: str, data: bytes) -> None:
  # Write then rename: another host or test worker never loads a half-written model.
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)

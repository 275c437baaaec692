"""SentencePiece tokenizer: training from in-memory text, and a small typed wrapper.

Every model trained here has the same special ids, so configs, packing and chat templates
never ask a tokenizer what they are: pad=0, unk=1, bos=2, eos=3, then the chat symbols in
`CHAT_SYMBOLS` (ids 4-9), then `MASK_SYMBOL` (id 10, the [MASK] of masked-LM pretraining),
each always a single token. Byte fallback is on, so any text encodes (an unseen character
becomes its UTF-8 bytes), and normalization is off
(`identity`, extra whitespace kept), so `decode(encode(text)) == text`. As usual for
SentencePiece, `encode` treats the start of a text as the start of a word (a leading "▁"
piece before a symbol); a chat template that needs a bare symbol takes `token_to_id`.
"""

import io
import json
import os
import random
import shutil
from typing import Iterable, Iterator

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_SYMBOLS = ("<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|end_of_turn|>")
# Reserved after the chat symbols so their ids stay 4-9; data/mlm_masking.py looks it up.
MASK_SYMBOL = "<|mask|>"
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
    vocab_size: the full vocabulary: 4 specials, 6 chat symbols, the mask symbol and 256
      byte pieces (byte fallback), one piece per distinct character, then learned merges;
      English text needs at least ~340.
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
      user_defined_symbols=[*CHAT_SYMBOLS, MASK_SYMBOL],
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


# --- Hugging Face tokenizer.json (Llama-3 / Qwen style byte-level BPE) ----------------------

_HF_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value) -> str | None:
  """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer (tokenizer.json) with `Tokenizer`'s interface.

  Special tokens come from tokenizer_config.json (or special_tokens_map.json) next to the
  tokenizer.json. Ids are the model's own, not 0-3. Without a BOS token (Qwen2) the EOS id
  also serves as BOS, and without a pad token the EOS id pads (as GPT-2 / Llama-3 fine-tuning
  usually does); a tokenizer without an unknown token (byte-level BPE needs none) reports
  `unk_id` -1, which `token_to_id` returns for a piece it lacks. `encode` adds no special
  token unless asked (the tokenizer.json post-processor is bypassed), and `decode` drops
  pad / BOS / EOS like the SentencePiece `Tokenizer` and keeps every other token's text.
  `chat_template` is the model's Jinja chat template ('' if none); `apply_chat_template`
  renders it.
  """

  def __init__(self, tokenizer_json: str, config: dict | None = None):
    from tokenizers import Tokenizer as _Tokenizer  # optional dependency, only for HF models
    self._json = tokenizer_json
    self._config = dict(config or {})
    self._tok = _Tokenizer.from_str(tokenizer_json)
    ids = {}
    for name in _HF_SPECIALS:
      content = _token_content(self._config.get(name))
      ids[name] = self._tok.token_to_id(content) if content is not None else None
    self._eos = ids["eos_token"] if ids["eos_token"] is not None else -1
    self._bos = ids["bos_token"] if ids["bos_token"] is not None else self._eos
    self._pad = ids["pad_token"] if ids["pad_token"] is not None else self._eos
    self._unk = ids["unk_token"] if ids["unk_token"] is not None else -1

  @classmethod
  def load(cls, path: str) -> "HFTokenizer":
    """From a tokenizer.json file or a folder holding one (plus its tokenizer_config.json)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    with open(json_path, encoding="utf-8") as f:
      text = f.read()
    config = _read_json(os.path.join(directory, "special_tokens_map.json"))
    config.update(_read_json(os.path.join(directory, "tokenizer_config.json")))
    template_file = os.path.join(directory, "chat_template.jinja")
    if not config.get("chat_template") and os.path.exists(template_file):
      with open(template_file, encoding="utf-8") as f:
        config["chat_template"] = f.read()
    return cls(text, config)

  def __getstate__(self) -> tuple:
    return self._json, self._config

  def __setstate__(self, state: tuple) -> None:
    self.__init__(*state)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def unk_id(self) -> int:
    return self._unk

  @property
  def chat_template(self) -> str:
    template = self._config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default", next(iter(named.values()), ""))
    return template

  def _frame(self, ids: list, add_bos: bool, add_eos: bool) -> list:
    return ([self._bos] if add_bos else []) + list(ids) + ([self._eos] if add_eos else [])

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list:
    """Token ids of `text`, optionally framed by BOS / EOS."""
    return self._frame(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

  def encode_batch(self, texts: list, add_bos: bool = False, add_eos: bool = False) -> list:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [self._frame(e.ids, add_bos, add_eos) for e in encodings]

  def decode(self, ids) -> str:
    """Text of `ids`; pad / BOS / EOS decode to nothing, other special tokens to their text."""
    dropped = {self._pad, self._bos, self._eos}
    return self._tok.decode([int(i) for i in ids if int(i) not in dropped],
                            skip_special_tokens=False)

  def decode_batch(self, batch) -> list:
    return [self.decode(ids) for ids in batch]

  def token_to_id(self, piece: str) -> int:
    """Id of `piece`; the unk id (-1 when the vocabulary has none) when there is no such piece."""
    token = self._tok.token_to_id(piece)
    return self._unk if token is None else token

  def id_to_token(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))

  def apply_chat_template(self, messages: list, add_generation_prompt: bool = False,
                          **kwargs) -> str:
    """Renders `messages` ([{"role", "content"}]) with the model's Jinja chat template, as
    `transformers` does (sandboxed, trim_blocks / lstrip_blocks, `raise_exception`)."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat_template")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise ValueError(f"chat template error: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    specials = {name: _token_content(self._config.get(name)) for name in _HF_SPECIALS}
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        **{k: v for k, v in specials.items() if v is not None}, **kwargs)


def load_tokenizer(path: str):
  """The tokenizer at `path`: an HF tokenizer.json (the file, or a folder holding one) gives
  an `HFTokenizer`; a SentencePiece .model (or a folder holding `spm.model` or
  `tokenizer.model`) gives a `Tokenizer`. Both have the same interface."""
  if os.path.isdir(path):
    for name in ("tokenizer.json", "spm.model", "tokenizer.model"):
      if os.path.exists(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(f"{path} holds no tokenizer.json, spm.model or tokenizer.model")
  if path.endswith(".json"):
    return HFTokenizer.load(path)
  return Tokenizer.load(path)


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja")


def is_hf_tokenizer(path: str) -> bool:
  """Whether `path` is a tokenizer.json or a folder holding one."""
  if os.path.isdir(path):
    return os.path.exists(os.path.join(path, "tokenizer.json"))
  return path.endswith(".json")


def copy_hf_tokenizer(path: str, target_dir: str) -> HFTokenizer:
  """Copies an HF tokenizer's files into `target_dir` (a run's `tokenizer/`, where later
  stages look for it) unless already there, and loads it."""
  source = path if os.path.isdir(path) else os.path.dirname(path)
  os.makedirs(target_dir, exist_ok=True)
  if os.path.abspath(source) != os.path.abspath(target_dir):
    for name in HF_TOKENIZER_FILES[1:]:
      if os.path.exists(os.path.join(source, name)):
        shutil.copyfile(os.path.join(source, name), os.path.join(target_dir, name))
    json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    shutil.copyfile(json_path, os.path.join(target_dir, "tokenizer.json"))
  return HFTokenizer.load(target_dir)

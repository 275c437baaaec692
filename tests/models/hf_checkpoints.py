"""Hugging Face folders built here for the conversion tests: a byte-level BPE tokenizer.json
(Qwen-style specials, so the chatml template renders) trained on the tiny world, next to a
random tiny model. Nothing is downloaded."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data import tiny_world

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PAD_ID, EOS_ID = 0, 2   # <|endoftext|>, <|im_end|>: specials come first, in order


def write_tokenizer(directory: str, vocab_size: int) -> str:
  """tokenizer.json + tokenizer_config.json (no BOS: EOS frames documents) in `directory`."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(tiny_world.generate_documents("train", 200), trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=None,
                   eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML), f)
  return directory

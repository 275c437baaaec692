r"""Trains a SentencePiece tokenizer on local .jsonl / .txt files.

  python -m scripts.train_tokenizer --input 'corpus/*.jsonl,extra.txt' --text_field text \
      --vocab_size 8000 --model_prefix out/tok [--model_type bpe|unigram]

Writes `{model_prefix}.model` (set `--config.data.tokenizer` to it) and a readable
`{model_prefix}.vocab`. The model has pad=0, unk=1, bos=2, eos=3 and the chat symbols as
single tokens (see data/tokenizer.py); byte fallback makes every text encodable.
"""

import time

from absl import app
from absl import flags
from absl import logging

from data import records
from data import tokenizer

_INPUT = flags.DEFINE_string("input", None, "Comma-separated globs of .jsonl / .txt files.",
                             required=True)
_MODEL_PREFIX = flags.DEFINE_string("model_prefix", None, "Output path without extension.",
                                    required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size, specials included.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "Segmentation model.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL field holding the text.")
_TXT_BLOCKS = flags.DEFINE_bool("txt_blocks", False,
                                ".txt: one document per blank-line-separated block.")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False,
                                  "Skip (and count) malformed records instead of failing.")
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", 0,
                                      "Train on a uniform sample of this many lines (0: all).")
_CHARACTER_COVERAGE = flags.DEFINE_float(
    "character_coverage", 1.0, "Share of characters given their own piece; lower (0.9995) "
    "for scripts with many rare characters.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the --max_sentences sample.")


def main(argv):
  del argv
  counter = records.SkipCounter()
  texts = records.iter_text_records(_INPUT.value, text_field=_TEXT_FIELD.value,
                                    txt_blocks=_TXT_BLOCKS.value,
                                    skip_invalid=_SKIP_INVALID.value, counter=counter)
  start = time.perf_counter()
  path = tokenizer.train_sentencepiece(
      texts, _MODEL_PREFIX.value, _VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
      seed=_SEED.value, character_coverage=_CHARACTER_COVERAGE.value,
      max_sentences=_MAX_SENTENCES.value)
  if counter.skipped:
    logging.warning("Skipped %d malformed records: %s", counter.skipped, dict(counter.reasons))
  tok = tokenizer.Tokenizer.load(path)
  print(f"Wrote {path}: {tok.vocab_size} pieces in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
  app.run(main)

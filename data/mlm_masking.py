"""BERT masking (80/10/10) as a pipeline transform, and the packed MLM batches built with it.

    texts -> shuffle -> repeat -> (global index, text) -> shard over hosts
          -> tokenize (BOS / EOS) -> mask with rng(seed, index) -> chunks of <= seq_len
          -> pack (data/packing.py, segment ids isolate documents) -> batch

(the grain chain of data/chain.py with `with_index`, `MaskDocument` as its encode transform
and `mlm_units` as its packing units).

Masking (Devlin et al., 2019, sec. 3.1 and appendix A.1): of a document's maskable tokens,
`max(1, round(15%))` are selected (the count BERT's create_pretraining_data.py uses); each
selected token becomes [MASK] with probability 0.8, a random token with probability 0.1, or
stays as it is. The model must predict the original token at every selected position, and
only there. Special tokens (pad, unk, BOS, EOS, chat symbols, the mask itself) are never
selected, and random replacements are drawn uniformly from the non-special ids (BERT draws from
the whole vocabulary; drawing a BOS or a chat symbol mid-sentence only adds noise).

Determinism: the random numbers of a document come from `np.random.default_rng([seed,
index])`, where `index` is the document's place in the shuffled, repeated stream *before* it
is split over hosts. So the masks depend on neither the number of hosts nor the grain workers,
resuming replays exactly the same masks, and a document seen again in a later epoch is masked
afresh (RoBERTa's dynamic masking, Liu et al., 2019). The eval split is neither shuffled nor
repeated: it is masked the same way at every evaluation.

[MASK] is the tokenizer's `<|mask|>` symbol (data/tokenizer.py `MASK_SYMBOL`, id 10), which
every tokenizer trained by this codebase reserves.

Batch rows: `inputs` (masked tokens), `targets` (original tokens), `loss_mask` (1 at selected
positions), `segment_ids`, `positions`.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import ml_collections
import numpy as np

from data import chain
from data.pipeline import load_texts
from data.tokenizer import CHAT_SYMBOLS, MASK_SYMBOL, Tokenizer


# The mask piece of this codebase's tokenizers, then BERT's (WordPiece) and RoBERTa's (BPE), so a
# converted checkpoint's own tokenizer.json masks with the token it was pretrained with.
MASK_PIECES = (MASK_SYMBOL, "[MASK]", "<mask>")
# BERT's / RoBERTa's other special pieces: never masked, never drawn as random replacements.
_HF_SPECIALS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>")


def special_token_ids(tokenizer: Tokenizer) -> tuple:
  """Ids that are never masked nor used as random replacements, sorted."""
  ids = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id}
  ids.update(tokenizer.token_to_id(s) for s in (*CHAT_SYMBOLS, *MASK_PIECES, *_HF_SPECIALS))
  return tuple(sorted(i for i in ids if i is not None and i >= 0))


def mask_token_id(tokenizer: Tokenizer) -> int:
  """The id of the first of `MASK_PIECES` the vocabulary has; an error if it has none."""
  for piece in MASK_PIECES:
    mask_id = tokenizer.token_to_id(piece)
    if mask_id not in (tokenizer.unk_id, -1, None):
      return mask_id
  raise ValueError(f"the tokenizer has none of the mask pieces {MASK_PIECES} (a sentencepiece "
                   "model trained before the mask was reserved?); retrain it (delete "
                   "{workdir}/tokenizer) for MLM")


@dataclasses.dataclass(frozen=True)
class MaskingRule:
  """Which tokens may be selected, how many, and what replaces them.

  Attributes:
    mask_id: the [MASK] id.
    special_ids: ids never selected nor drawn as replacements.
    vocab_size: replacements are drawn from [0, vocab_size) minus `special_ids`.
    mask_rate: share of a document's maskable tokens selected (at least one).
    mask_token_rate: share of the selected tokens replaced by [MASK].
    random_token_rate: share of the selected tokens replaced by a random token; the rest
      (1 - mask_token_rate - random_token_rate) keep their token.
  """
  mask_id: int
  special_ids: tuple
  vocab_size: int
  mask_rate: float = 0.15
  mask_token_rate: float = 0.8
  random_token_rate: float = 0.1

  def __post_init__(self):
    if not 0.0 <= self.mask_rate <= 1.0:
      raise ValueError(f"mask_rate must be in [0, 1], got {self.mask_rate}")
    if (min(self.mask_token_rate, self.random_token_rate) < 0.0
        or self.mask_token_rate + self.random_token_rate > 1.0):
      raise ValueError("need mask_token_rate, random_token_rate >= 0 with a sum <= 1, got "
                       f"{self.mask_token_rate}, {self.random_token_rate}")

  @classmethod
  def for_tokenizer(cls, tokenizer: Tokenizer, **rates) -> "MaskingRule":
    return cls(mask_id=mask_token_id(tokenizer), special_ids=special_token_ids(tokenizer),
               vocab_size=tokenizer.vocab_size, **rates)

  @functools.cached_property
  def replacement_ids(self) -> np.ndarray:
    return np.setdiff1d(np.arange(self.vocab_size, dtype=np.int32),
                        np.asarray(self.special_ids, np.int32))

  def apply(self, tokens, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Masks one document.

    Args:
      tokens: `[n]` token ids.
      rng: the document's generator.
    Returns:
      (inputs `[n]` int32 with the replacements, loss_mask `[n]` float32, 1 where selected).
    """
    tokens = np.asarray(tokens, np.int32)
    inputs, loss_mask = tokens.copy(), np.zeros(len(tokens), np.float32)
    candidates = np.flatnonzero(~np.isin(tokens, self.special_ids))
    if not len(candidates) or self.mask_rate == 0.0:
      return inputs, loss_mask
    count = min(len(candidates), max(1, int(self.mask_rate * len(candidates) + 0.5)))
    chosen = np.sort(rng.choice(candidates, count, replace=False))
    u = rng.random(count)
    to_mask = chosen[u < self.mask_token_rate]
    to_random = chosen[(u >= self.mask_token_rate)
                       & (u < self.mask_token_rate + self.random_token_rate)]
    inputs[to_mask] = self.mask_id
    inputs[to_random] = rng.choice(self.replacement_ids, len(to_random))
    loss_mask[chosen] = 1.0
    return inputs, loss_mask


class MaskDocument:
  """(global index, text) -> {inputs, targets, loss_mask} of the whole document, masked."""

  def __init__(self, tokenizer: Tokenizer, rule: MaskingRule, seed: int, add_bos: bool,
               add_eos: bool):
    if seed < 0:
      raise ValueError(f"the masking seed must be >= 0, got {seed}")
    self._tokenizer, self._rule, self._seed = tokenizer, rule, seed
    self._add_bos, self._add_eos = add_bos, add_eos

  def __call__(self, indexed: tuple) -> dict:
    index, text = indexed
    tokens = np.asarray(self._tokenizer.encode(text, add_bos=self._add_bos,
                                               add_eos=self._add_eos), np.int32)
    inputs, loss_mask = self._rule.apply(tokens, np.random.default_rng([self._seed, index]))
    return {"inputs": inputs, "targets": tokens, "loss_mask": loss_mask}


def mlm_units(example: dict, seq_len: int) -> list:
  """A masked document as packing units: consecutive chunks of at most `seq_len` tokens.

  Unlike causal chunks these do not overlap: an MLM target is the token itself, not the next.
  """
  n = len(example["inputs"])
  return [[{key: value[start:start + seq_len] for key, value in example.items()}]
          for start in range(0, n, seq_len)]


def _documents(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               rule: MaskingRule, *, split: str, seed: int, num_epochs: int | None,
               workdir: str | None) -> dict:
  """`chain.make_stream` arguments shared by `masked_documents` and `make_mlm_dataset`."""
  train = split == "train"
  texts = load_texts(data_config, split, workdir)
  if not len(texts):
    raise ValueError(f"no documents in the {split} split of {data_config.source!r}")
  # The index is taken before sharding: a document's mask is the same however many hosts.
  return dict(streams=grain.MapDataset.source(texts), shuffle=train and data_config.shuffle,
              seed=seed, num_epochs=1 if num_epochs is None and not train else num_epochs,
              with_index=True,
              encode=MaskDocument(tokenizer, rule, seed, data_config.add_bos,
                                  data_config.add_eos))


def masked_documents(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                     rule: MaskingRule, *, split: str, shard_index: int = 0,
                     shard_count: int = 1, seed: int = 0, num_epochs: int | None = None,
                     workdir: str | None = None) -> grain.MapDataset:
  """This host's masked documents, in stream order, before packing (index-based: random access).

  Element j of shard k of K is element j * K + k of the single-host stream, masked the same.
  Returns dicts of `[n]` arrays: `inputs` (masked), `targets` (original), `loss_mask`.
  """
  return chain.make_stream(
      shard_index=shard_index, shard_count=shard_count,
      **_documents(data_config, tokenizer, rule, split=split, seed=seed, num_epochs=num_epochs,
                   workdir=workdir))


def make_mlm_dataset(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                     rule: MaskingRule, *, split: str, seq_len: int, batch_size: int,
                     shard_index: int = 0, shard_count: int = 1, seed: int = 0,
                     num_epochs: int | None = None,
                     workdir: str | None = None) -> grain.IterDataset:
  """The masked, packed MLM batches of one host; arguments as `data.pipeline.make_clm_dataset`.

  Args:
    rule: how documents are masked (`MaskingRule.for_tokenizer(tokenizer, ...)`).
    seed: shuffles the train split and, with each document's stream index, seeds its mask.

  Returns:
    Batches of numpy arrays `[batch_size, seq_len]`: `inputs` (masked), `targets`
    (original), `loss_mask` (1 at selected positions), `segment_ids`, `positions`.
  """
  return chain.make_batches(
      shard_index=shard_index, shard_count=shard_count, to_units=mlm_units, seq_len=seq_len,
      pack_bins=data_config.pack_bins, batch_size=batch_size,
      worker_count=data_config.worker_count,
      **_documents(data_config, tokenizer, rule, split=split, seed=seed, num_epochs=num_epochs,
                   workdir=workdir))

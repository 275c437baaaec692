"""Replay mixing: train on a new corpus with a share of the original one mixed in by weight.

Continued pretraining on a new domain alone forgets the old one; replaying a few percent of
the original data limits that (Ibrahim et al., 2024, "Simple and Scalable Strategies to
Continually Pre-train Large Language Models"). The corpora are mixed by *documents*:

    main texts   -> shuffle(seed)     -> repeat --\
                                                   mix (weights 1 - w, w) -> shard over hosts
    replay texts -> shuffle(seed + 1) -> repeat --/     -> tokenize -> pack -> batch

That is the grain chain of data/chain.py given both corpora as streams. `MapDataset.mix`
interleaves them in a fixed pattern that realises the weights exactly over every window of a
few hundred documents (0.8 / 0.2 gives 4 main, 1 replay, ...), so the mixed stream is a pure
function of the index: deterministic, the same split over any number of hosts, and resumable
from the few integers of the iterator state.

The replay corpus is described by the `config.data.replay_*` fields; every other data setting
(tokenizer, BOS / EOS, skip_invalid, ...) is shared with the main corpus.
"""

from __future__ import annotations

import grain
import ml_collections

from data import chain
from data.pipeline import Tokenize, clm_units, load_texts
from data.tokenizer import Tokenizer

# config.data field of the replay corpus -> the field it replaces in the replay's data config.
_REPLAY_FIELDS = {"replay_source": "source", "replay_tiny_world_domain": "tiny_world_domain",
                  "replay_train_files": "train_files", "replay_eval_files": "eval_files",
                  "replay_tfds_name": "tfds_name"}


def replay_data_config(data_config: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict | None:
  """`config.data` describing the replay corpus, or None when `replay_source` is empty."""
  if not data_config.get("replay_source"):
    return None
  replay = ml_collections.ConfigDict(data_config.copy_and_resolve_references().to_dict())
  for field, target in _REPLAY_FIELDS.items():
    replay[target] = data_config[field]
  return replay


def _corpora(data_config: ml_collections.ConfigDict, split: str,
             workdir: str | None) -> tuple[list[grain.MapDataset], list[float]]:
  """The main and replay texts of `split` as chain streams, and their mixing weights.

  Raises:
    ValueError: no replay corpus, a weight outside (0, 1), or an empty corpus.
  """
  weight = float(data_config.replay_weight)
  replay_config = replay_data_config(data_config)
  if replay_config is None or not 0.0 < weight < 1.0:
    raise ValueError("replay mixing needs config.data.replay_source and 0 < replay_weight < 1,"
                     f" got {data_config.get('replay_source')!r} and {weight}")
  streams = []
  for name, part_config in (("main", data_config), ("replay", replay_config)):
    texts = load_texts(part_config, split, workdir)
    if not len(texts):
      raise ValueError(f"no documents in the {split} split of {part_config.source!r} "
                       f"({name} corpus)")
    streams.append(grain.MapDataset.source(texts))
  return streams, [1.0 - weight, weight]


def mixed_texts(data_config: ml_collections.ConfigDict, *, split: str, seed: int = 0,
                num_epochs: int | None = None, workdir: str | None = None) -> grain.MapDataset:
  """The main and replay texts mixed by `data_config.replay_weight`, before sharding.

  Both corpora are shuffled (when `data_config.shuffle`) with different seeds and repeated
  `num_epochs` times (None: forever).

  Raises:
    ValueError: no replay corpus, or a weight outside (0, 1).
  """
  streams, weights = _corpora(data_config, split, workdir)
  return chain.make_stream(streams, weights=weights, shuffle=data_config.shuffle, seed=seed,
                           num_epochs=num_epochs)


def make_mixed_clm_dataset(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                           split: str, seq_len: int, batch_size: int, shard_index: int = 0,
                           shard_count: int = 1, seed: int = 0, num_epochs: int | None = None,
                           workdir: str | None = None) -> grain.IterDataset:
  """CLM batches of the main corpus mixed with `data_config.replay_weight` of the replay one.

  Arguments and batches as `data.pipeline.make_clm_dataset`; the texts as `mixed_texts`.
  """
  streams, weights = _corpora(data_config, split, workdir)
  return chain.make_batches(
      streams, weights=weights, shuffle=data_config.shuffle, seed=seed, num_epochs=num_epochs,
      shard_index=shard_index, shard_count=shard_count,
      encode=Tokenize(tokenizer, data_config.add_bos, data_config.add_eos),
      to_units=clm_units, seq_len=seq_len, pack_bins=data_config.pack_bins,
      batch_size=batch_size, worker_count=data_config.worker_count)

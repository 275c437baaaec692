"""Reward model: a decoder with a scalar head, trained on preference pairs by Bradley-Terry.

Each pair is one packing unit of two segments, [chosen, rejected] (data/preferences.py, whole
sequences: the last token is the closing token of the answer), so one forward pass scores both
answers of every pair in the batch; a sequence's reward is the head's score at its last real
token (objectives/pairs.py `segment_last`).

config.objective: `center_coef` (reward centering, 0: off), `use_margin` (subtract the
records' `margin` field when present). Held-out figures come from the loss metrics on the eval
split: `eval/accuracy`, `eval/margin`, `eval/chosen`, `eval/rejected`.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from data.preferences import make_preference_dataset
from objectives.pairs import pair_mask, segment_last, split_pairs
from objectives.reward import bradley_terry_loss
from training.batch_shapes import packed_rows
from training.stage import Stage


def reward_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """Scores every sequence of a packed pair batch -> per-pair loss, metrics."""
  del rng, frozen
  segment_ids = batch["segment_ids"]
  scores = model(batch["inputs"], positions=batch["positions"], segment_ids=segment_ids)
  chosen, rejected = split_pairs(segment_last(scores, segment_ids))
  margin = split_pairs(segment_last(batch["margins"], segment_ids))[0] if cfg.use_margin else None
  return bradley_terry_loss(chosen, rejected, pair_mask(batch["sides"], segment_ids),
                            margin=margin, center_coef=cfg.center_coef)


def make_dataset(config, tokenizer, **kwargs):
  return make_preference_dataset(config.data, tokenizer, kind="preferences", shift=False,
                                 **kwargs)


def abstract_batch(config) -> dict:
  """`Stage.abstract_batch`: packed whole-sequence pairs (data/preferences.py)."""
  return packed_rows(config, sides=jnp.int32, example_ids=jnp.int32, margins=jnp.float32)


STAGE = Stage(name="reward", loss_fn=reward_forward, make_dataset=make_dataset,
              model_kind="reward", abstract_batch=abstract_batch)

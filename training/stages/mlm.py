"""Masked-LM pretraining of the bidirectional encoder: packed masked text, cross-entropy at
the masked positions (objectives/mlm.py; masking in data/mlm_masking.py)."""

from __future__ import annotations

import ml_collections

from data.mlm_masking import MaskingRule, make_mlm_dataset
from objectives.mlm import mlm_loss
from training.batch_shapes import packed_rows
from training.stage import Stage


def mlm_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """Encoder on a packed batch {inputs (masked), targets (original), loss_mask (selected),
  segment_ids, positions}: attention is bidirectional within each segment."""
  del rng, cfg, frozen
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return mlm_loss(logits, batch["targets"], batch["loss_mask"],
                  token_mask=batch["segment_ids"] > 0)


def make_dataset(config, tokenizer, **kwargs):
  objective = config.objective
  rule = MaskingRule.for_tokenizer(tokenizer, mask_rate=objective.mask_rate,
                                   mask_token_rate=objective.mask_token_rate,
                                   random_token_rate=objective.random_token_rate)
  return make_mlm_dataset(config.data, tokenizer, rule, seq_len=config.data.seq_len, **kwargs)


def abstract_batch(config) -> dict:
  """`Stage.abstract_batch`: packed masked text (data/mlm_masking.py)."""
  return packed_rows(config)


STAGE = Stage(name="mlm", loss_fn=mlm_forward, make_dataset=make_dataset, model_kind="encoder",
              abstract_batch=abstract_batch)

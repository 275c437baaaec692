"""Causal-LM pretraining and continued pretraining: packed text, next-token cross-entropy."""

from __future__ import annotations

import ml_collections

from data.pipeline import make_clm_dataset
from objectives.clm import clm_loss
from training.stages import Stage


def clm_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """Causal LM on a packed batch {inputs, targets, loss_mask, segment_ids, positions}."""
  del rng, frozen
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return clm_loss(logits, batch["targets"], batch["loss_mask"], z_loss=cfg.z_loss)


def make_dataset(config, tokenizer, **kwargs):
  return make_clm_dataset(config.data, tokenizer, seq_len=config.data.seq_len, **kwargs)


STAGE = Stage(name="clm", loss_fn=clm_forward, make_dataset=make_dataset)

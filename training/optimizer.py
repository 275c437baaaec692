"""AdamW with linear warmup then cosine / linear / constant decay, global-norm clipping, and
weight decay masked off norms and biases (Loshchilov & Hutter, 2019; decay on gains and biases
only hurts, as GPT-3 and LLaMA training setups note). For partial fine-tuning
(`config.train.trainable`) the whole chain sees only the trained parts (training/trainable.py):
clipping, moments and decay ignore frozen params, which get no optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from training.trainable import TrainableParts


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `cfg.lr` over `cfg.warmup_steps`, then decay to
  `cfg.lr * cfg.end_lr_ratio` at `total_steps`."""
  warmup = max(int(cfg.warmup_steps), 0)
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_ratio
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"config.optimizer.schedule: unknown {cfg.schedule!r} "
                     "(cosine | linear | constant)")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for the params weight decay applies to: not norms, not biases."""
  def is_decayed(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    return not any("norm" in k or k.endswith("bias") for k in keys)
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   parts: TrainableParts | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) from `config.optimizer`; with `parts`, the optimizer
  updates only those parts of the params (the rest get -0.0 updates: unchanged)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  transforms = []
  if cfg.grad_clip and cfg.grad_clip > 0:
    transforms.append(optax.clip_by_global_norm(cfg.grad_clip))
  transforms.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, mask=decay_mask))
  optimizer = optax.chain(*transforms)
  return (optimizer if parts is None else parts.optimizer(optimizer)), schedule

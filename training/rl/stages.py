"""The RL algorithms as entries of the stage registry (training/registry.py), so every tool that
looks a run's objective up (scripts/train.py, scripts/evaluate.py, ...) knows them. Their
`train` is training/rl/loop.py's own loop: they have no packed dataset and no supervised step
loop."""

from __future__ import annotations

import jax.numpy as jnp

from training.batch_shapes import shapes
from training.rl.algorithms import ALGORITHMS
from training.rl.loop import train_rl
from training.stage import Stage


def no_dataset(config, *args, **kwargs):
  raise ValueError(f"the {config.objective.name!r} stage samples its own data from prompts "
                   "(training/rl/rollout.py); it has no packed dataset: train it with "
                   "scripts/train.py (training/rl/loop.py train_rl)")


def on_policy_update(config) -> bool:
  """Whether the rollout skips the policy's log-prob pass: one update per iteration of an
  algorithm whose loss reuses its own log-probs (training/rl/loop.py RLTrainer)."""
  rl = config.rl
  return ALGORITHMS[config.objective.name].reuses_log_probs and rl.epochs * rl.minibatches == 1


def abstract_minibatch(config) -> dict:
  """`Stage.abstract_batch`: one minibatch of the arrays the algorithm's `make_batch` gives
  the train step (training/rl/ppo.py, grpo.py, online_dpo.py): reply rows (or, for online
  DPO, chosen / rejected pairs) of the prompt (`rl.max_prompt_len`) and reply
  (`rl.max_new_tokens`), `rows / rl.minibatches` of them."""
  rl, name = config.rl, config.objective.name
  row, reply = (rl.max_prompt_len + rl.max_new_tokens,), (rl.max_new_tokens,)
  layout = {k: (row, jnp.int32) for k in ("tokens", "positions", "segment_ids")}
  if ALGORITHMS[name].units == "pairs":
    fields = {f"{side}_{k}": v for side in ("chosen", "rejected")
              for k, v in {**layout, "mask": (reply, jnp.float32)}.items()}
    fields.update(ref_chosen=((1,), jnp.float32), ref_rejected=((1,), jnp.float32),
                  pair_mask=((1,), jnp.float32))
    return shapes(rl.prompts_per_iteration // rl.minibatches, fields)
  per_token = ["mask", "advantages"]
  per_token += ["old_values", "returns"] if name == "ppo" else ["ref_log_probs"]
  if not on_policy_update(config):  # else the loss takes its own log-probs as pi_old's
    per_token.append("old_log_probs")
  fields = {**layout, **{k: (reply, jnp.float32) for k in per_token}}
  return shapes(rl.prompts_per_iteration * rl.samples_per_prompt // rl.minibatches, fields)


STAGES = tuple(Stage(name=name, loss_fn=algorithm.loss_fn, make_dataset=no_dataset,
                     train=train_rl, abstract_batch=abstract_minibatch)
               for name, algorithm in ALGORITHMS.items())

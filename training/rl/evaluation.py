"""Evaluation of an RL policy: greedy replies to held-out prompts (and to its own).

For the first `config.eval.num_prompts` distinct eval prompts (the tiny world's validation
questions, or `config.data.eval_files`), greedy replies of up to `config.eval.max_new_tokens`
tokens give

  eval/reward           mean score (reward function / model, missing-stop penalty included):
                        the figure RL raises
  eval/answer_accuracy  reply states the prompt's answer (data/tiny_tasks.answer_correct), when
                        the prompts carry answers: comparable to SFT's eval/answer_accuracy
  eval/stop_rate        reply ended with a stop token
  eval/response_length  tokens per reply
  eval/kl               KL to the reference along the reply: sum over its tokens of the exact
                        KL(pi(.|s_t) || pi_ref(.|s_t)) of the next-token distributions (greedy
                        replies are no samples of pi, so no Monte-Carlo estimate: the exact
                        per-token KL at the states the policy visits)

The same figures on the first `config.eval.num_prompts` distinct prompts RL trains on come
as `eval_train/*`: how far the policy has moved on its own prompts, against `eval/*`, how much
of that carries over to prompts it never saw.

Run at iteration 0 (the initial, i.e. SFT, policy: the "before" figures) and every
`config.train.eval_every` iterations.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data import tiny_tasks
from parallel.rules import use_mesh_rules
from training.rl.policy import response_logits, token_kl
from training.rl.rollout import PromptItem, RolloutEngine, to_global, to_host


class Evaluator:
  """Greedy held-out evaluation with one compiled sampler and one compiled KL pass."""

  def __init__(self, engine: RolloutEngine, sets: dict[str, Sequence[PromptItem]], *,
               batch_size: int, max_new_tokens: int):
    """`sets`: prefix ('eval', 'eval_train') -> its prompts."""
    if not all(sets.values()):
      raise ValueError("no prompts to evaluate")
    self.engine, self.sets, self.batch_size = engine, dict(sets), batch_size
    self._sample = engine.make_sampler(max_new_tokens, temperature=0.0)
    spec, mesh, rules = engine.spec, engine.mesh, engine.rules
    ref_spec = engine.ref_spec

    def kl_per_reply(params, ref_params, rows):
      with use_mesh_rules(mesh, rules):
        t = rows["mask"].shape[1]
        kl = token_kl(response_logits(spec.bind(params), rows, t),
                      response_logits(ref_spec.bind(ref_params), rows, t))
        return (kl * rows["mask"]).sum(-1)

    self._kl = jax.jit(kl_per_reply, out_shardings=NamedSharding(mesh, P()))

  def __call__(self, params) -> dict[str, float]:
    out = {}
    for prefix, items in self.sets.items():
      out.update({f"{prefix}/{k}": v for k, v in self.evaluate(params, items).items()})
    return out

  def evaluate(self, params, all_items: Sequence[PromptItem]) -> dict[str, float]:
    """reward, kl, response_length, stop_rate (and answer_accuracy) of greedy replies."""
    engine, n = self.engine, len(all_items)
    scores, kls, lengths, stopped, correct = [], [], [], [], []
    for start in range(0, n, self.batch_size):
      items = list(all_items[start:start + self.batch_size])
      real = len(items)
      # Full batches only: one compile, and the batch splits over the mesh.
      items = items + [items[0]] * (self.batch_size - real)
      rng = jax.random.PRNGKey(0)  # unused: greedy
      rows, mask, replies, stop = engine.sample(self._sample, params, items, rng)
      prompts = [it.prompt for it in items]
      part_scores = engine.score(rows, replies, stop, prompts)
      device = to_global({**{k: rows[k] for k in ("tokens", "positions", "segment_ids")},
                          "mask": mask}, engine.mesh, engine.rules)
      part_kl = to_host(self._kl(params, engine.ref_params, device))
      scores.extend(part_scores[:real])
      kls.extend(part_kl[:real])
      lengths.extend(mask.sum(-1)[:real])
      stopped.extend(stop[:real])
      correct.extend(tiny_tasks.answer_correct(r, p.answer)
                     for r, p in zip(replies or (), prompts[:real]) if p.answer is not None)
    out = {"reward": float(np.mean(scores)), "kl": float(np.mean(kls)),
           "response_length": float(np.mean(lengths)), "stop_rate": float(np.mean(stopped))}
    if correct:
      out["answer_accuracy"] = float(np.mean(correct))
    return out

"""Evaluation of an RL policy: greedy and sampled replies to held-out prompts (and its own).

For the first `config.eval.num_prompts` distinct eval prompts (the tiny world's validation
questions, or `config.data.eval_files`), replies of up to `config.eval.max_new_tokens` tokens
give two sets of figures.

Greedy replies (one per prompt: the policy's single best guess):

  eval/reward           mean score (reward function / model, missing-stop penalty included)
  eval/answer_accuracy  reply states the prompt's answer (the run's config.data.answer_checker,
                        data/verifiers.py), when the prompts carry answers: comparable to
                        SFT's eval/answer_accuracy, which uses the same checker
  eval/stop_rate        reply ended with a stop token
  eval/response_length  tokens per reply
  eval/kl               KL to the reference along the reply: sum over its tokens of the exact
                        KL(pi(.|s_t) || pi_ref(.|s_t)) of the next-token distributions (greedy
                        replies are no samples of pi, so no Monte-Carlo estimate: the exact
                        per-token KL at the states the policy visits)

Sampled replies (`config.eval.samples` per prompt at the rollouts' temperature, top-k and
top-p): the policy's expected reward E_{y ~ pi(.|x)} r(x, y), the quantity RL maximises and
the "eval reward" RLHF papers report. It moves where greedy replies need not: sharpening the
policy towards replies it already gives some of the time raises it, while the greedy reply
changes only when the most likely reply flips.

  eval/sampled_reward           mean score over the samples (missing-stop penalty included)
  eval/sampled_answer_accuracy  share of samples stating the answer (when prompts have one)
  eval/sampled_stop_rate        share of samples that ended with a stop token
  eval/sampled_kl               mean over samples of the summed exact per-token KL along the
                                reply: an unbiased, low-variance estimate of the sequence-level
                                KL(pi || pi_ref) on these prompts

The sampling keys are a fixed function of (`config.seed`, prompt set, batch), the same at
every evaluation, so the before and after figures share their randomness (common random
numbers: the difference measures the policy, not the draw).

The same figures on the first `config.eval.num_prompts` distinct prompts RL trains on come
as `eval_train/*`: how far the policy has moved on its own prompts, against `eval/*`, how much
of that carries over to prompts it never saw.

Run at iteration 0 (the initial, i.e. SFT, policy: the "before" figures) and every
`config.train.eval_every` iterations.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data.prompts import PromptItem
from parallel.host_data import to_global, to_host
from parallel.rules import use_mesh_rules
from training.rl.policy import response_logits, token_kl
from training.rl.rollout import RolloutEngine, repeat_items


class Evaluator:
  """Greedy and sampled held-out evaluation: one compiled sampler each, one compiled KL pass
  (every batch is full, so each compiles once)."""

  def __init__(self, engine: RolloutEngine, sets: dict[str, Sequence[PromptItem]], *,
               batch_size: int, max_new_tokens: int, samples: int = 0,
               sampling: dict | None = None, seed: int = 0):
    """`sets`: prefix ('eval', 'eval_train') -> its prompts. `samples`: sampled replies per
    prompt (0: greedy figures only) with `sampling`, the sampler's temperature / top_k / top_p
    (the rollouts' own, `config.rl`'s, in train_rl). `seed`: of the fixed sampling keys."""
    if not all(sets.values()):
      raise ValueError("no prompts to evaluate")
    if samples < 0:
      raise ValueError(f"config.eval.samples must be >= 0, got {samples}")
    self.engine, self.sets, self.batch_size = engine, dict(sets), batch_size
    self.samples, self.seed = samples, seed
    self._greedy = engine.make_sampler(max_new_tokens, temperature=0.0)
    self._sampled = (engine.make_sampler(max_new_tokens, **(sampling or {}))
                     if samples else None)
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
      out.update({f"{prefix}/{k}": v for k, v in self.evaluate(params, items, prefix).items()})
    return out

  def evaluate(self, params, items: Sequence[PromptItem], name: str = "eval"
               ) -> dict[str, float]:
    """Greedy reward, kl, response_length, stop_rate (and answer_accuracy) of `items`, and
    with `samples` the sampled_* figures; `name` picks the set's fixed sampling keys."""
    greedy = self._replies(params, items, self._greedy, lambda batch: jax.random.PRNGKey(0))
    out = {"reward": float(np.mean(greedy["scores"])), "kl": float(np.mean(greedy["kls"])),
           "response_length": float(np.mean(greedy["lengths"])),
           "stop_rate": float(np.mean(greedy["stopped"]))}
    if greedy["correct"]:
      out["answer_accuracy"] = float(np.mean(greedy["correct"]))
    if self.samples:
      # Keys depend on (seed, set, batch) only, never on the iteration: every evaluation of
      # this set draws with the same randomness.
      base = jax.random.fold_in(jax.random.PRNGKey(self.seed), zlib.crc32(name.encode()))
      sampled = self._replies(params, repeat_items(items, self.samples), self._sampled,
                              lambda batch: jax.random.fold_in(base, batch))
      out.update({"sampled_reward": float(np.mean(sampled["scores"])),
                  "sampled_kl": float(np.mean(sampled["kls"])),
                  "sampled_stop_rate": float(np.mean(sampled["stopped"]))})
      if sampled["correct"]:
        out["sampled_answer_accuracy"] = float(np.mean(sampled["correct"]))
    return out

  def _replies(self, params, all_items: Sequence[PromptItem], sample_fn,
               batch_key: Callable[[int], jax.Array]) -> dict[str, list]:
    """Per reply to each of `all_items`: score, KL, length, stopped, and answer correctness
    (for items with answers), from `sample_fn` in full batches, batch i drawn with
    `batch_key(i)`."""
    engine, n = self.engine, len(all_items)
    out = {"scores": [], "kls": [], "lengths": [], "stopped": [], "correct": []}
    for batch, start in enumerate(range(0, n, self.batch_size)):
      items = list(all_items[start:start + self.batch_size])
      real = len(items)
      # Full batches only: one compile, and the batch splits over the mesh.
      items = items + [items[0]] * (self.batch_size - real)
      rows, mask, replies, stop = engine.sample(sample_fn, params, items, batch_key(batch))
      prompts = [it.prompt for it in items]
      part_scores = engine.score(rows, replies, stop, prompts)
      device = to_global({**{k: rows[k] for k in ("tokens", "positions", "segment_ids")},
                          "mask": mask}, engine.mesh, engine.rules)
      part_kl = to_host(self._kl(params, engine.ref_params, device))
      out["scores"].extend(part_scores[:real])
      out["kls"].extend(part_kl[:real])
      out["lengths"].extend(mask.sum(-1)[:real])
      out["stopped"].extend(stop[:real])
      out["correct"].extend(engine.check_answers(replies, prompts[:real]))
    return out

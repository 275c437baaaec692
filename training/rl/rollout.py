"""Rollouts: prompts -> sampled replies -> scores, policy / reference log-probs and values.

    prompts (data/prompts.py PromptItems: records rendered by the chat template, each left-
    padded to P = config.rl.max_prompt_len) x G samples each
      -> models/sampler.py (KV cache, temperature / top-k / top-p), up to T new tokens
      -> rows  tokens / positions / segment_ids `[B, P + T]`: the prompt, then the reply;
               segment 1 on real tokens, 0 on padding; positions count from the first real
               token (so a row computes what it would alone)
      -> scores: reward function on the decoded reply and/or reward model at the last token,
               minus the missing-stop penalty, plus overlong shaping (training/rl/rewards.py)
      -> (dynamic sampling: more rounds of prompts until enough groups carry a signal)
      -> one jitted forward pass per chunk of rows: log pi, log pi_ref of every reply token
               and the values V_t (PPO), all `[B, T]`

Log-probs are recomputed by the training forward pass (not taken from the sampler), in the
chunks the first epoch's minibatches use, so the first update sees a ratio of exactly 1. When
the update is that first minibatch alone (one epoch, one minibatch) pi_old *is* the policy
being updated, and algorithms whose loss can take its own log-probs under stop_gradient as
log pi_old (GRPO, RLOO) skip the policy's pass here: only the reference's runs
(`RolloutEngine.complete(policy=False)`; training/rl/loop.py decides).

Dynamic sampling (`draw_groups`; DAPO, Yu et al., 2025, sec. 3.2): a group of G replies whose
scores are all equal has advantage 0 on every reply, so it adds nothing to the policy gradient
and only shrinks the batch's effective size. With `config.rl.dynamic_sampling` such groups
are dropped and further rounds of `rl.prompts_per_iteration` prompts are sampled until the
batch holds that many groups with a signal, or `rl.dynamic_sampling_max_rounds` extra rounds
are spent; then the remaining slots take dropped groups (the batch keeps its shape; GRPO
masks them out of its loss, online DPO gets no pair from them). Groups are judged on the
scores the advantages come from (penalties and overlong shaping included), so a group is
dropped exactly when all its advantages are 0; the paper states its filter on accuracy, which
is the same with a 0 / 1 answer reward and no shaping. Round r's prompts and sampling key are
pure functions of (seed, iteration, r), so a resumed run draws the same.

Every host holds the whole rollout: host arrays go to the devices as global arrays of which
each process feeds its own rows, and device results come back replicated
(parallel/host_data.py `to_global` / `to_host`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data import chat_template, verifiers
from data.conversation import Prompt
from data.prompts import PromptItem
from models import sampler
from parallel.host_data import to_global, to_host
from parallel.rules import use_mesh_rules
from training.rl import rewards
from training.rl.episodes import EpisodeSampler
from training.rl.policy import policy_outputs, response_log_probs


# --- Prompts --------------------------------------------------------------------------------------

def prompt_batch(items: Sequence[PromptItem], iteration: int, size: int, seed: int,
                 stream: int = 0) -> list[PromptItem]:
  """The `size` prompts of `iteration`: consecutive slices of a stream of per-epoch
  permutations, a pure function of the iteration (so a resumed run sees the same ones).
  `stream` r > 0: another such stream, the prompts of dynamic sampling's extra round r."""
  out, start = [], iteration * size
  for position in range(start, start + size):
    epoch, index = divmod(position, len(items))
    key = [seed, epoch] if stream == 0 else [seed, epoch, stream]
    order = np.random.default_rng(key).permutation(len(items))
    out.append(items[order[index]])
  return out


# --- Layout ---------------------------------------------------------------------------------------

def build_rows(prompt_tokens: np.ndarray, prompt_lengths: np.ndarray, response: np.ndarray,
               mask: np.ndarray) -> dict[str, np.ndarray]:
  """Rows of left-padded prompts `[B, P]` followed by replies `[B, T]` (module docstring).

  Returns numpy `tokens`, `positions`, `segment_ids` `[B, P + T]` int32 and `last` `[B]`,
  the index of each row's last real token.
  """
  p = prompt_tokens.shape[1]
  real = np.concatenate([np.arange(p)[None, :] >= (p - prompt_lengths)[:, None],
                         np.asarray(mask) > 0], axis=1)
  first = (p - prompt_lengths)[:, None]
  positions = np.where(real, np.arange(real.shape[1])[None, :] - first, 0).astype(np.int32)
  lengths = np.asarray(mask).sum(-1).astype(np.int32)
  return {"tokens": np.concatenate([prompt_tokens, response], axis=1).astype(np.int32),
          "positions": positions, "segment_ids": real.astype(np.int32),
          "last": (p + lengths - 1).astype(np.int32)}


# --- Rollouts -------------------------------------------------------------------------------------

@dataclasses.dataclass
class PendingSample:
  """A sampler call in flight (`RolloutEngine.start_sample`): its prompts and the sampler's
  device outputs, or (tool episodes, sampled on the host) the finished result."""
  items: Sequence[PromptItem]
  prompt_tokens: np.ndarray | None = None
  prompt_lengths: np.ndarray | None = None
  out: dict[str, jax.Array] | None = None
  done: tuple | None = None


@dataclasses.dataclass
class Rollout:
  """B sampled episodes, rows grouped by prompt (its G samples consecutive); numpy arrays.
  The model outputs and answer checks are None / empty until `RolloutEngine.complete`."""
  prompts: list[Prompt]          # per row
  rows: dict[str, np.ndarray]    # build_rows layout
  mask: np.ndarray               # [B, T] float32, 1 on reply tokens (stop token included)
  replies: list[str] | None      # decoded, stop token removed (None: nothing reads text)
  stopped: np.ndarray            # [B] bool: ended with a stop token
  scores: np.ndarray             # [B] float32, penalties and shaping included
  log_probs: np.ndarray | None = None      # [B, T] log pi (training forward), 0 where masked;
                                           # None when skipped (on-policy single update)
  ref_log_probs: np.ndarray | None = None  # [B, T] log pi_ref
  values: np.ndarray | None = None         # [B, T] V_t (PPO) or None
  answers_correct: list[bool] = dataclasses.field(default_factory=list)
  # per row whose prompt has an answer: the reply states it
  behaviour_log_probs: np.ndarray | None = None  # [B, T] log mu: a stale rollout's sampling
                                                 # policy (training/rl/offpolicy.py), else None

  def batch_rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """The forward-pass fields of rows `index` (what every RL loss reads)."""
    return {k: self.rows[k][index] for k in ("tokens", "positions", "segment_ids")}

  def take(self, index: np.ndarray) -> Rollout:
    """Rows `index` of a rollout not yet completed (no model outputs)."""
    return Rollout(prompts=[self.prompts[i] for i in index],
                   rows={k: v[index] for k, v in self.rows.items()}, mask=self.mask[index],
                   replies=None if self.replies is None else [self.replies[i] for i in index],
                   stopped=self.stopped[index], scores=self.scores[index])


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
  """The rows of `parts` (rollouts not yet completed), in order."""
  cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
  replies = None if parts[0].replies is None else [r for p in parts for r in p.replies]
  return Rollout(prompts=[x for p in parts for x in p.prompts],
                 rows={k: np.concatenate([p.rows[k] for p in parts]) for k in parts[0].rows},
                 mask=cat("mask"), replies=replies, stopped=cat("stopped"),
                 scores=cat("scores"))


def informative_groups(scores: np.ndarray, g: int) -> np.ndarray:
  """`[N]` bool: whether each group of G consecutive scores holds two different ones (a
  group of equal scores has advantage 0 on every reply: no signal)."""
  groups = np.asarray(scores).reshape(-1, g)
  return groups.max(-1) > groups.min(-1)


def rollout_metrics(r: Rollout) -> dict[str, float]:
  """Iteration figures: mean score, KL(pi || pi_ref) per reply (k1, summed over its tokens;
  when the policy's log-probs were computed), reply length, stop rate, and answer accuracy
  when the prompts have answers."""
  out = {"score": float(r.scores.mean()), "score_std": float(r.scores.std()),
         "response_length": float(r.mask.sum(-1).mean()),
         "stop_rate": float(r.stopped.mean())}
  if r.log_probs is not None:  # else the loss reports it (training/rl/loop.py)
    out["kl"] = float(((r.log_probs - r.ref_log_probs) * r.mask).sum(-1).mean())
  if r.answers_correct:
    out["answer_accuracy"] = float(np.mean(r.answers_correct))
  return out


class RolloutEngine:
  """Samples, scores and evaluates log-probs / values for one run (jitted once per shape)."""

  def __init__(self, config: ml_collections.ConfigDict, spec, tokenizer, mesh, rules, *,
               ref_spec, ref_params, reward_fn: verifiers.RewardFn | None,
               reward_model: rewards.RewardModelScorer | None,
               answer_check: verifiers.AnswerChecker):
    if reward_fn is None and reward_model is None:
      raise ValueError("set config.reward.function and/or config.reward.model")
    self.config, self.spec, self.tokenizer = config, spec, tokenizer
    self.mesh, self.rules = mesh, rules
    self.ref_spec, self.ref_params = ref_spec, ref_params
    self.reward_fn, self.reward_model = reward_fn, reward_model
    # The run's answer check (data/verifiers.py), for the answer accuracy of rollouts and of
    # the evaluation, which uses this engine.
    self.answer_check = answer_check
    self.stops = chat_template.stop_ids(tokenizer, config.data.chat_template)
    # With config.rl.tools every reply is a multi-turn episode (training/rl/episodes.py).
    self.episodes = EpisodeSampler.from_config(config, tokenizer, self.stops, mesh, rules)
    rl = config.rl
    # The rollouts' weights: the compute dtype or weight-only int8 (models/quantize.py;
    # training/rl/offpolicy.py corrects for the quantized behaviour policy).
    self.rollout_weights = rl.rollout_weights
    self.decode_gemm = rl.get("decode_gemm", "xla")  # models/decode_gemm.py
    self._sample = self.make_sampler(rl.max_new_tokens, temperature=rl.temperature,
                                     top_k=rl.top_k, top_p=rl.top_p,
                                     weights=self.rollout_weights)
    replicated = NamedSharding(mesh, P())

    def forward(params, ref_params, rows, policy: bool):
      with use_mesh_rules(mesh, rules):
        t = rows["mask"].shape[1]
        ref_log_probs = response_log_probs(ref_spec.bind(ref_params), rows, t)
        out = {"ref_log_probs": ref_log_probs * rows["mask"]}
        if policy:
          log_probs, _, values = policy_outputs(spec.bind(params), rows, t)
          out["log_probs"] = log_probs * rows["mask"]
          if values is not None:
            out["values"] = values * rows["mask"]
        return out

    # Both compile on first use only: a run calls one of them.
    self._forward = {policy: jax.jit(functools.partial(forward, policy=policy),
                                     out_shardings=replicated) for policy in (True, False)}

  @property
  def rollout_sampler(self):
    """The sampler of the rollouts (`config.rl` settings) on this run's mesh."""
    return self._sample

  def make_sampler(self, max_new_tokens: int, *, mesh=None, **settings):
    """A sampler of this run on its mesh, or on `mesh` (off-policy rollout devices)."""
    return sampler.make_sampler(self.spec, max_new_tokens=max_new_tokens,
                                eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                stop_ids=self.stops, mesh=mesh or self.mesh, rules=self.rules,
                                gemm=self.decode_gemm, **settings)

  def sample(self, sample_fn, params, items: Sequence[PromptItem], rng: jax.Array
             ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str] | None, np.ndarray]:
    """(rows, mask `[B, T]`, replies (None when no reward function or answer needs their
    text), stopped `[B]`) of one sampler call; with tools, of one episode per item
    (training/rl/episodes.py: the reply region holds the model's and the tools' tokens, the
    mask only the model's)."""
    return self.collect_sample(self.start_sample(sample_fn, params, items, rng))

  def start_sample(self, sample_fn, params, items: Sequence[PromptItem], rng: jax.Array, *,
                   mesh=None) -> PendingSample:
    """Dispatches `sample`'s sampler call on this run's mesh or `mesh` (where `params` and
    `sample_fn` live) and returns without waiting for the devices (JAX dispatch is
    asynchronous); `collect_sample` waits. Tool episodes run turn by turn on the host, so
    they are sampled here, before returning."""
    if self.episodes is not None:
      out = self.episodes.sample(sample_fn, params, items, rng, mesh=mesh)
      return PendingSample(items, done=(
          build_rows(out.prompt_tokens, out.prompt_lengths, out.tokens, out.present),
          out.loss_mask, out.replies, out.stopped))
    prompt_tokens, prompt_lengths = sampler.left_pad([it.tokens for it in items],
                                                     self.config.rl.max_prompt_len,
                                                     self.tokenizer.pad_id)
    device = to_global({"t": prompt_tokens, "l": prompt_lengths}, mesh or self.mesh,
                       self.rules)
    return PendingSample(items, prompt_tokens, prompt_lengths,
                         sample_fn(params, device["t"], device["l"], rng))

  def collect_sample(self, pending: PendingSample
                     ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str] | None, np.ndarray]:
    """`sample`'s result of a `start_sample` call (waits for its devices)."""
    if pending.done is not None:
      return pending.done
    items, prompt_tokens, prompt_lengths, out = (pending.items, pending.prompt_tokens,
                                                 pending.prompt_lengths, pending.out)
    tokens, mask = to_host(out["tokens"]), to_host(out["mask"]).astype(np.float32)
    lengths = mask.sum(-1).astype(np.int32)
    last = tokens[np.arange(len(items)), np.maximum(lengths - 1, 0)]
    stopped = (lengths > 0) & np.isin(last, self.stops)
    replies = None
    if self.reward_fn is not None or any(it.prompt.answer is not None for it in items):
      # Text only where a reward function or an answer check reads it.
      replies = [self.tokenizer.decode(row[:n - int(s)].tolist())
                 for row, n, s in zip(tokens, lengths, stopped)]
    return build_rows(prompt_tokens, prompt_lengths, tokens, mask), mask, replies, stopped

  def score(self, rows: dict[str, np.ndarray], replies: Sequence[str] | None,
            stopped: np.ndarray, prompts: Sequence[Prompt]) -> np.ndarray:
    """`[B]` scores: function and / or reward model, minus the missing-stop penalty."""
    scores = rewards.stop_penalties(stopped, self.config.reward.missing_stop_penalty)
    if self.reward_fn is not None:
      scores = scores + rewards.function_scores(self.reward_fn, replies, prompts)
    if self.reward_model is not None:
      device = to_global({k: rows[k] for k in ("tokens", "positions", "segment_ids", "last")},
                         self.mesh, self.rules)
      scores = scores + to_host(self.reward_model(device))
    return scores.astype(np.float32)

  def check_answers(self, replies: Sequence[str] | None, prompts: Sequence[Prompt]
                    ) -> list[bool]:
    """Whether each reply states its prompt's answer (`answer_check`), for the prompts that
    have one."""
    return [bool(self.answer_check(r, p.answer)) for r, p in zip(replies or (), prompts)
            if p.answer is not None]

  def forward(self, params, rows: dict[str, np.ndarray], mask: np.ndarray,
              chunks: Sequence[np.ndarray], *, policy: bool = True) -> dict[str, np.ndarray]:
    """Reference and (with `policy`) policy log-probs and values `[B, T]`, chunk by chunk."""
    out: dict[str, np.ndarray] = {}
    for index in chunks:
      part = {k: rows[k][index] for k in ("tokens", "positions", "segment_ids")}
      part["mask"] = mask[index]
      result = self._forward[policy](params, self.ref_params,
                                     to_global(part, self.mesh, self.rules))
      for k, v in result.items():
        out.setdefault(k, np.zeros((len(mask),) + v.shape[1:], np.float32))[index] = to_host(v)
    return out

  def draw(self, params, items: Sequence[PromptItem], rng: jax.Array
           ) -> tuple[Rollout, dict[str, float]]:
    """Sampled and scored replies to `items` (already repeated G times; not yet completed)
    and the seconds it took, `generate_s` and `score_s`."""
    start = time.perf_counter()
    return self.finish_draw(self.start_sample(self._sample, params, items, rng), start)

  def finish_draw(self, pending: PendingSample, start: float | None = None
                  ) -> tuple[Rollout, dict[str, float]]:
    """`draw`'s result of a `start_sample` call, scored on this run's mesh; `generate_s`
    counts from `start` (default: now, the wait for samples dispatched earlier: the part of
    their generation not overlapped with other work)."""
    start = time.perf_counter() if start is None else start
    items = pending.items
    rows, mask, replies, stopped = self.collect_sample(pending)
    generated = time.perf_counter()
    prompts = [it.prompt for it in items]
    scores = self.score(rows, replies, stopped, prompts) + rewards.overlong_penalties(
        mask.sum(-1), self.config.rl.max_new_tokens, self.config.reward.overlong_buffer)
    rollout = Rollout(prompts=prompts, rows=rows, mask=mask, replies=replies, stopped=stopped,
                      scores=scores)
    return rollout, {"generate_s": generated - start,
                     "score_s": time.perf_counter() - generated}

  def complete(self, params, rollout: Rollout, chunks: Sequence[np.ndarray], *,
               policy: bool = True) -> Rollout:
    """`rollout` with its log-probs, values and answer checks; `policy=False` skips the
    policy's pass (log_probs and values stay None)."""
    model = self.forward(params, rollout.rows, rollout.mask, chunks, policy=policy)
    return dataclasses.replace(rollout, log_probs=model.get("log_probs"),
                               ref_log_probs=model["ref_log_probs"], values=model.get("values"),
                               answers_correct=self.check_answers(rollout.replies,
                                                                  rollout.prompts))


def draw_groups(engine: RolloutEngine, params, round_items: Callable[[int], list[PromptItem]],
                rng: jax.Array, *, groups: int, g: int, max_extra_rounds: int
                ) -> tuple[Rollout, dict[str, float], dict[str, float]]:
  """Dynamic sampling (module docstring): `groups` groups of G replies with a signal.

  Args:
    engine: draws each round.
    params: the policy.
    round_items: r -> the prompts of round r, each repeated G times (`groups` x G items).
    rng: the key of round 0; round r > 0 draws with `fold_in(rng, r)`.
    groups: groups in the batch.
    g: replies per group.
    max_extra_rounds: the cap on rounds after the first.
  Returns:
    (the rollout, not yet completed: groups with a signal in draw order, then as many
    dropped groups as the cap left slots, the seconds of `draw`, figures: `extra_rounds`,
    `zero_signal_drawn` (share of the drawn groups without a signal), `filled_groups` (slots
    left to groups without a signal), `drawn_score` (mean score of every drawn reply: the
    batch's own `score` is biased by the selection)).
  """
  kept, dropped, scores = [], [], []
  times = {"generate_s": 0.0, "score_s": 0.0}
  for r in range(max_extra_rounds + 1):
    part, part_times = engine.draw(params, round_items(r), rng if r == 0
                                   else jax.random.fold_in(rng, r))
    times = {k: times[k] + part_times[k] for k in times}
    scores.append(part.scores)
    signal = informative_groups(part.scores, g)
    for group, has_signal in enumerate(signal):
      (kept if has_signal else dropped).append(part.take(np.arange(group * g, (group + 1) * g)))
    if len(kept) >= groups:
      break
  filled = max(groups - len(kept), 0)
  drawn = sum(len(s) for s in scores) // g
  figures = {"extra_rounds": float(r), "zero_signal_drawn": len(dropped) / drawn,
             "filled_groups": float(filled),
             "drawn_score": float(np.mean(np.concatenate(scores)))}
  return concat_rollouts(kept[:groups] + dropped[:filled]), times, figures


def repeat_items(items: Sequence[PromptItem], times: int) -> list[PromptItem]:
  """Each prompt `times` times in a row (a GRPO group is consecutive rows)."""
  return [it for it in items for _ in range(times)]


def chunk_indices(size: int, chunks: int) -> list[np.ndarray]:
  """`chunks` consecutive equal index blocks of `range(size)`."""
  if size % chunks:
    raise ValueError(f"{size} rows do not split into {chunks} equal minibatches")
  return list(np.arange(size).reshape(chunks, -1))

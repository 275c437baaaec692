"""Rollouts: prompts -> sampled replies -> scores, policy / reference log-probs and values.

    prompts (data/conversation.py Prompt records, rendered by the chat template, each left-
    padded to P = config.rl.max_prompt_len) x G samples each
      -> models/sampler.py (KV cache, temperature / top-k / top-p), up to T new tokens
      -> rows  tokens / positions / segment_ids `[B, P + T]`: the prompt, then the reply;
               segment 1 on real tokens, 0 on padding; positions count from the first real
               token (so a row computes what it would alone)
      -> scores: reward function on the decoded reply and/or reward model at the last token,
               minus the missing-stop penalty (training/rl/rewards.py)
      -> one jitted forward pass per chunk of rows: log pi, log pi_ref of every reply token
               and the values V_t (PPO), all `[B, T]`

Log-probs are recomputed by the training forward pass (not taken from the sampler), in the
chunks the first epoch's minibatches use, so the first update sees a ratio of exactly 1.

Every host holds the whole rollout: host arrays go to the devices as global arrays of which
each process feeds its own rows, and device results come back replicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from data import chat_template, tiny_tasks
from data.conversation import Prompt, read_records
from models import sampler
from parallel.host_data import row_blocks
from parallel.rules import batch_sharding, logical_to_spec, use_mesh_rules
from training.rl import rewards
from training.rl.policy import policy_outputs, response_log_probs


# --- Prompts -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptItem:
  prompt: Prompt             # context (ends with the user's turn) and optional answer
  tokens: tuple[int, ...]    # rendered with the assistant header, at most max_prompt_len


def fit_prompt(tokens: Sequence[int], max_len: int) -> list[int]:
  """Keeps the first token (BOS) and the last `max_len - 1`: the question and the assistant
  header are at the end."""
  tokens = list(tokens)
  return tokens if len(tokens) <= max_len else tokens[:1] + tokens[len(tokens) - max_len + 1:]


TINY_PROMPT_SETS = ("unseen", "sft")


def _held_out_half(prompt: str) -> bool:
  """Splits the unseen questions in two by a hash of their text (independent of the
  train / validation split of data/tiny_tasks.py)."""
  return zlib.crc32(f"rl-eval/{prompt}".encode()) % 2 == 1


def tiny_prompt_files(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """The tiny world's RL prompt files {'train': ..., 'eval': ...} (`config.data.tiny_prompts`):

    unseen  questions the SFT stage never trained on (data/tiny_tasks.py's validation split),
            split in two by a hash of their text: RL trains on one half and is evaluated on
            the other, which no stage ever trains on
    sft     RL on the SFT training questions, evaluated on the validation questions
  """
  data, folder = config.data, os.path.join(workdir, "data")
  if data.tiny_prompts not in TINY_PROMPT_SETS:
    raise ValueError(f"config.data.tiny_prompts: unknown {data.tiny_prompts!r} "
                     f"({' | '.join(TINY_PROMPT_SETS)})")
  if data.tiny_prompts == "sft":
    paths = tiny_tasks.ensure_tiny_tasks(folder, "prompts", data.tiny_task_train_records,
                                         data.tiny_task_eval_records, seed=config.seed)
    return {"train": paths["train"], "eval": paths["validation"]}
  records = tiny_tasks.prompt_records("validation", data.tiny_task_train_records
                                      + data.tiny_task_eval_records, seed=config.seed)
  paths = {}
  for split, held_out in (("train", False), ("eval", True)):
    path = os.path.join(folder, f"tiny_prompts_unseen-{split}.jsonl")
    text = "".join(json.dumps(r) + "\n" for r in records
                   if _held_out_half(r["prompt"]) == held_out)
    if not (os.path.exists(path) and open(path, encoding="utf-8").read() == text):
      os.makedirs(folder, exist_ok=True)
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, path)
    paths[split] = path
  return paths


def prompt_files(config: ml_collections.ConfigDict, split: str, workdir: str) -> str:
  """The prompt JSONL pattern of `split` ('train' | 'eval'), writing the tiny world's."""
  data = config.data
  if data.source == "tiny_world":
    return tiny_prompt_files(config, workdir)[split]
  if data.source != "files":
    raise ValueError(f"config.data.source: RL stages read 'tiny_world' or 'files', got "
                     f"{data.source!r}")
  pattern = data.train_files if split == "train" else data.eval_files
  if not pattern:
    raise ValueError(f"config.data.{'train' if split == 'train' else 'eval'}_files is empty")
  return pattern


def load_prompts(config: ml_collections.ConfigDict, tokenizer, split: str, workdir: str, *,
                 distinct: bool = False, limit: int = 0) -> list[PromptItem]:
  """Rendered prompts of a split; `distinct` drops repeated prompts, `limit` > 0 keeps the
  first `limit`."""
  items, seen = [], set()
  for p in read_records(prompt_files(config, split, workdir), "prompts",
                        skip_invalid=config.data.skip_invalid):
    if distinct:
      if p.context in seen:
        continue
      seen.add(p.context)
    tokens = chat_template.render_prompt(tokenizer, p.context, config.data.chat_template)
    items.append(PromptItem(p, tuple(fit_prompt(tokens, config.rl.max_prompt_len))))
    if limit and len(items) == limit:
      break
  if not items:
    raise ValueError(f"no {split} prompts")
  return items


def prompt_batch(items: Sequence[PromptItem], iteration: int, size: int, seed: int
                 ) -> list[PromptItem]:
  """The `size` prompts of `iteration`: consecutive slices of a stream of per-epoch
  permutations, a pure function of the iteration (so a resumed run sees the same ones)."""
  out, start = [], iteration * size
  for position in range(start, start + size):
    epoch, index = divmod(position, len(items))
    order = np.random.default_rng([seed, epoch]).permutation(len(items))
    out.append(items[order[index]])
  return out


# --- Layout and host <-> device -------------------------------------------------------------------

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


def batch_shards(mesh, rules) -> int:
  """How many ways a batch splits over the mesh (batch sizes must be multiples of it)."""
  axes = logical_to_spec(("batch",), rules, mesh=mesh)[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def to_global(arrays: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Global batch-sharded arrays from host arrays every process holds in full."""
  out = {}
  for k, v in arrays.items():
    sharding = batch_sharding(mesh, rules, ndim=v.ndim)
    # This process's rows: the blocks its devices hold, in row order.
    blocks = row_blocks(sharding, v.shape[0])[jax.process_index()]
    local = np.concatenate([v[start:stop] for start, stop in blocks])
    out[k] = jax.make_array_from_process_local_data(sharding, local, v.shape)
  return out


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host sharded) array on every host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- Rollouts -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rollout:
  """B sampled episodes, rows grouped by prompt (its G samples consecutive); numpy arrays."""
  prompts: list[Prompt]          # per row
  rows: dict[str, np.ndarray]    # build_rows layout
  mask: np.ndarray               # [B, T] float32, 1 on reply tokens (stop token included)
  replies: list[str] | None      # decoded, stop token removed (None: nothing reads text)
  stopped: np.ndarray            # [B] bool: ended with a stop token
  scores: np.ndarray             # [B] float32, penalty included
  log_probs: np.ndarray          # [B, T] log pi (training forward), 0 where masked
  ref_log_probs: np.ndarray      # [B, T] log pi_ref
  values: np.ndarray | None      # [B, T] V_t (PPO) or None

  def batch_rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """The forward-pass fields of rows `index` (what every RL loss reads)."""
    return {k: self.rows[k][index] for k in ("tokens", "positions", "segment_ids")}


def rollout_metrics(r: Rollout) -> dict[str, float]:
  """Iteration figures: mean score, KL(pi || pi_ref) per reply (k1, summed over its tokens),
  reply length, stop rate, and answer accuracy when the prompts have answers."""
  kl = ((r.log_probs - r.ref_log_probs) * r.mask).sum(-1)
  out = {"score": float(r.scores.mean()), "score_std": float(r.scores.std()),
         "kl": float(kl.mean()), "response_length": float(r.mask.sum(-1).mean()),
         "stop_rate": float(r.stopped.mean())}
  answered = [tiny_tasks.answer_correct(reply, p.answer) for reply, p in
              zip(r.replies or (), r.prompts) if p.answer is not None]
  if answered:
    out["answer_accuracy"] = float(np.mean(answered))
  return out


class RolloutEngine:
  """Samples, scores and evaluates log-probs / values for one run (jitted once per shape)."""

  def __init__(self, config: ml_collections.ConfigDict, spec, tokenizer, mesh, rules, *,
               ref_spec, ref_params, reward_fn: rewards.RewardFn | None,
               reward_model: rewards.RewardModelScorer | None):
    if reward_fn is None and reward_model is None:
      raise ValueError("set config.reward.function and/or config.reward.model")
    self.config, self.spec, self.tokenizer = config, spec, tokenizer
    self.mesh, self.rules = mesh, rules
    self.ref_spec, self.ref_params = ref_spec, ref_params
    self.reward_fn, self.reward_model = reward_fn, reward_model
    self.stops = chat_template.stop_ids(tokenizer, config.data.chat_template)
    rl = config.rl
    self._sample = self.make_sampler(rl.max_new_tokens, temperature=rl.temperature,
                                     top_k=rl.top_k, top_p=rl.top_p)
    replicated = NamedSharding(mesh, P())

    def forward(params, ref_params, rows):
      with use_mesh_rules(mesh, rules):
        t = rows["mask"].shape[1]
        log_probs, _, values = policy_outputs(spec.bind(params), rows, t)
        ref_log_probs = response_log_probs(ref_spec.bind(ref_params), rows, t)
        out = {"log_probs": log_probs * rows["mask"],
               "ref_log_probs": ref_log_probs * rows["mask"]}
        if values is not None:
          out["values"] = values * rows["mask"]
        return out

    self._forward = jax.jit(forward, out_shardings=replicated)

  def make_sampler(self, max_new_tokens: int, **settings):
    return sampler.make_sampler(self.spec, max_new_tokens=max_new_tokens,
                                eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                stop_ids=self.stops, mesh=self.mesh, rules=self.rules,
                                **settings)

  def sample(self, sample_fn, params, items: Sequence[PromptItem], rng: jax.Array
             ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str] | None, np.ndarray]:
    """(rows, mask `[B, T]`, replies (None when no reward function or answer needs their
    text), stopped `[B]`) of one sampler call."""
    prompt_tokens, prompt_lengths = sampler.left_pad([it.tokens for it in items],
                                                     self.config.rl.max_prompt_len,
                                                     self.tokenizer.pad_id)
    device = to_global({"t": prompt_tokens, "l": prompt_lengths}, self.mesh, self.rules)
    out = sample_fn(params, device["t"], device["l"], rng)
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

  def forward(self, params, rows: dict[str, np.ndarray], mask: np.ndarray,
              chunks: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Policy / reference log-probs (and values) `[B, T]`, computed chunk by chunk."""
    out: dict[str, np.ndarray] = {}
    for index in chunks:
      part = {k: rows[k][index] for k in ("tokens", "positions", "segment_ids")}
      part["mask"] = mask[index]
      result = self._forward(params, self.ref_params, to_global(part, self.mesh, self.rules))
      for k, v in result.items():
        out.setdefault(k, np.zeros((len(mask),) + v.shape[1:], np.float32))[index] = to_host(v)
    return out

  def collect(self, params, items: Sequence[PromptItem], rng: jax.Array,
              chunks: Sequence[np.ndarray]) -> tuple[Rollout, dict[str, float]]:
    """One rollout of `items` (already repeated G times) and its timings in seconds."""
    start = time.perf_counter()
    rows, mask, replies, stopped = self.sample(self._sample, params, items, rng)
    generated = time.perf_counter()
    prompts = [it.prompt for it in items]
    scores = self.score(rows, replies, stopped, prompts)
    model = self.forward(params, rows, mask, chunks)
    rollout = Rollout(prompts=prompts, rows=rows, mask=mask, replies=replies, stopped=stopped,
                      scores=scores, log_probs=model["log_probs"],
                      ref_log_probs=model["ref_log_probs"], values=model.get("values"))
    return rollout, {"generate_s": generated - start,
                     "score_s": time.perf_counter() - generated}


def repeat_items(items: Sequence[PromptItem], times: int) -> list[PromptItem]:
  """Each prompt `times` times in a row (a GRPO group is consecutive rows)."""
  return [it for it in items for _ in range(times)]


def chunk_indices(size: int, chunks: int) -> list[np.ndarray]:
  """`chunks` consecutive equal index blocks of `range(size)`."""
  if size % chunks:
    raise ValueError(f"{size} rows do not split into {chunks} equal minibatches")
  return list(np.arange(size).reshape(chunks, -1))

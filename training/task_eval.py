"""Task evaluation of a run's model: multiple choice by log-likelihood, generation scored by an
answer checker, perplexity of text (task files: data/eval_tasks.py, docs/formats.md).

    multiple choice   log p(choice | context), summed over the choice's tokens, for every
                      choice; `acc`: the highest sum is the answer; `acc_norm`: the highest
                      sum divided by the choice's length in characters (with its leading
                      space), as lm-evaluation-harness scores ARC and HellaSwag
    generation        greedy reply (models/sampler.py, KV cache) to the prompt, rendered with
                      the run's chat template when it has one; `accuracy` by the task's
                      checker (data/verifiers.py; the run's `data.answer_checker` if unset)
    perplexity        exp(mean NLL per token) over every token of every text after BOS;
                      `nll_per_token` and `bits_per_byte` too

Scoring is batched and sharded as training is: rows of `batch_size` sequences, right-padded
to a multiple of `LENGTH_BUCKET`, laid out by the mesh's batch sharding (each process passes
its own rows; training/evaluation.py `global_batch`), through one jitted forward per shape
whose outputs are replicated, so every process reads every score. A continuation's tokens
are those of `context + " " + choice` after the context's own tokens (lm-evaluation-harness's
split), so a tokenizer that merges across the boundary is scored on what it would produce.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data import chat_template
from data.conversation import Turn
from data.eval_tasks import Generation, MultipleChoice, Perplexity, TaskItem, read_tasks
from data.verifiers import get_answer_checker
from models.sampler import Sampler
from objectives.clm import token_log_probs
from parallel.host_data import process_rows
from parallel.rules import batch_sharding, use_mesh_rules
from training.evaluation import global_batch
from training.reports import TASK_RESULTS
from training.runs import LoadedModel, load_model

LENGTH_BUCKET = 64
DELIMITER = " "   # between a multiple-choice context and its choice (lm-evaluation-harness)


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list, list]:
  """(context ids with BOS, continuation ids): the whole text's tokens after the context's."""
  whole = tokenizer.encode(context + continuation) if context else tokenizer.encode(
      continuation.lstrip())
  head = tokenizer.encode(context) if context else []
  if whole[:len(head)] != head:  # the tokenizer merged across the boundary: split texts
    whole = head + tokenizer.encode(continuation.lstrip())
  return [tokenizer.bos_id] + head, whole[len(head):]


class TaskScorer:
  """Log-likelihoods and greedy replies of one loaded model (see the module docstring)."""

  def __init__(self, model: LoadedModel, tokenizer, *, batch_size: int = 32,
               max_new_tokens: int = 64, template: str = ""):
    self.model, self.tokenizer = model, tokenizer
    self.batch_size, self.max_new_tokens, self.template = batch_size, max_new_tokens, template
    self.sharding = batch_sharding(model.mesh, model.rules)
    self.rows = process_rows(self.sharding, batch_size)
    self.max_length = int(model.spec.config.max_length)
    self.sampler = Sampler(model.spec, model.mesh, model.rules)
    self._forward = jax.jit(self._sequence_scores, out_shardings=NamedSharding(model.mesh, P()))

  def _sequence_scores(self, params, batch):
    """Per row: summed log-prob of the target tokens under `loss_mask`, `[batch]`."""
    with use_mesh_rules(self.model.mesh, self.model.rules):
      logits = self.model.spec.bind(params)(batch["inputs"], positions=batch["positions"],
                                             segment_ids=batch["segment_ids"])
      logps = token_log_probs(logits, batch["targets"])
      return jnp.sum(logps * batch["loss_mask"], axis=-1)

  def log_likelihoods(self, pairs: Sequence[tuple[list, list]]) -> np.ndarray:
    """log p(continuation | context) float64 `[len(pairs)]` for (context ids, continuation
    ids) pairs; a pair longer than the model's `max_length` loses its oldest context tokens."""
    out = np.zeros(len(pairs))
    for start in range(0, len(pairs), self.batch_size):
      chunk = list(pairs[start:start + self.batch_size])
      real = len(chunk)
      chunk += [chunk[0]] * (self.batch_size - real)  # full batches: one compile per length
      sequences = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in chunk]
      scored = [min(len(cont), len(seq) - 1) for seq, (_, cont) in zip(sequences, chunk)]
      longest = max(len(s) - 1 for s in sequences)
      length = min(LENGTH_BUCKET * math.ceil(longest / LENGTH_BUCKET), self.max_length)
      arrays = {k: np.zeros((self.batch_size, length), np.int32)
                for k in ("inputs", "targets", "positions", "segment_ids")}
      arrays["loss_mask"] = np.zeros((self.batch_size, length), np.float32)
      for row, (seq, n) in enumerate(zip(sequences, scored)):
        size = len(seq) - 1
        arrays["inputs"][row, :size] = seq[:-1]
        arrays["targets"][row, :size] = seq[1:]
        arrays["positions"][row, :size] = np.arange(size)
        arrays["segment_ids"][row, :size] = 1
        arrays["loss_mask"][row, size - n:size] = 1.0
      begin, stop = self.rows
      batch = global_batch({k: v[begin:stop] for k, v in arrays.items()}, self.sharding,
                           self.batch_size)
      scores = np.asarray(jax.device_get(self._forward(self.model.params, batch)))
      out[start:start + real] = scores[:real]
    return out

  def replies(self, prompts: Sequence[str]) -> list[str]:
    """Greedy replies (decoded, stop token removed) to `prompts`."""
    tok = self.tokenizer
    if self.template:
      rendered = [chat_template.render_prompt(tok, (Turn("user", p),), self.template)
                  for p in prompts]
      stops = chat_template.stop_ids(tok, self.template)
    else:
      rendered, stops = [[tok.bos_id] + tok.encode(p) for p in prompts], [tok.eos_id]
    replies = []
    for start in range(0, len(rendered), self.batch_size):
      out = self.sampler.generate(self.model.params, rendered[start:start + self.batch_size],
                                  max_new_tokens=self.max_new_tokens, eos_id=tok.eos_id,
                                  pad_id=tok.pad_id, stop_ids=stops, temperature=0.0)
      for row, length in zip(out.tokens, out.lengths):
        ids = [int(t) for t in row[:int(length)]]
        replies.append(tok.decode(ids[:-1] if ids and ids[-1] in stops else ids))
    return replies


def score_multiple_choice(items: Sequence[MultipleChoice], scorer: TaskScorer
                          ) -> dict[str, float]:
  """acc and acc_norm (see the module docstring) over `items`."""
  pairs, lengths = [], []
  for item in items:
    for choice in item.choices:
      pairs.append(continuation_tokens(scorer.tokenizer, item.context, DELIMITER + choice))
      lengths.append(len(DELIMITER + choice))
  scores = scorer.log_likelihoods(pairs)
  acc, acc_norm, start = [], [], 0
  for item in items:
    n = len(item.choices)
    ll = scores[start:start + n]
    norm = ll / np.asarray(lengths[start:start + n], np.float64)
    acc.append(int(np.argmax(ll)) == item.answer)
    acc_norm.append(int(np.argmax(norm)) == item.answer)
    start += n
  return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
          "count": float(len(items))}


def score_generation(items: Sequence[Generation], scorer: TaskScorer, default_checker: str
                     ) -> dict[str, float]:
  """Greedy accuracy of `items` by each item's checker (or `default_checker`)."""
  replies = scorer.replies([it.prompt for it in items])
  correct = [bool(get_answer_checker(it.checker or default_checker)(r, it.answer))
             for r, it in zip(replies, items)]
  return {"accuracy": float(np.mean(correct)), "count": float(len(items))}


def score_perplexity(items: Sequence[Perplexity], scorer: TaskScorer) -> dict[str, float]:
  """Token perplexity, NLL per token and bits per UTF-8 byte of the texts."""
  tok = scorer.tokenizer
  pairs = [([tok.bos_id], tok.encode(it.text)) for it in items]
  total = float(np.sum(scorer.log_likelihoods(pairs)))
  tokens = sum(len(cont) for _, cont in pairs)
  num_bytes = sum(len(it.text.encode("utf-8")) for it in items)
  return {"perplexity": math.exp(-total / tokens), "nll_per_token": -total / tokens,
          "bits_per_byte": -total / math.log(2) / num_bytes, "count": float(len(items))}


def evaluate_items(items: Sequence[TaskItem], scorer: TaskScorer, default_checker: str
                   ) -> dict[str, float]:
  """Every type's figures of a task's items, as `{type}/{metric}`."""
  by_type: dict[type, list] = collections.defaultdict(list)
  for item in items:
    by_type[type(item)].append(item)
  scorers: dict[type, tuple[str, Callable]] = {
      MultipleChoice: ("multiple_choice", lambda xs: score_multiple_choice(xs, scorer)),
      Generation: ("generation", lambda xs: score_generation(xs, scorer, default_checker)),
      Perplexity: ("perplexity", lambda xs: score_perplexity(xs, scorer))}
  out = {}
  for kind, xs in by_type.items():
    name, score = scorers[kind]
    out.update({f"{name}/{k}": v for k, v in score(xs).items()})
  return out




def task_name(path: str) -> str:
  """A task's name in the results: a built-in's name, else the file's name sans extension."""
  return os.path.splitext(os.path.basename(path))[0]


def evaluate_tasks(workdir: str, tasks: Sequence[str], *, batch_size: int = 32,
                   max_new_tokens: int = 64, limit: int = 0) -> dict[str, float]:
  """Scores the latest checkpoint of the run in `workdir` (a LoRA run merged) on each task
  (a file or a built-in name; data/eval_tasks.py) and writes `{workdir}/task_eval.json`.

  Returns:
    `{"tasks/{name}/{type}/{metric}": value}`, e.g. `tasks/arc_easy/multiple_choice/acc`.
  """
  model = load_model(workdir, kind="decoder")
  config = model.config
  scorer = TaskScorer(model, model.tokenizer, batch_size=batch_size,
                      max_new_tokens=max_new_tokens,
                      template=config.data.get("chat_template", ""))
  results = {}
  for path in tasks:
    name = task_name(path)
    figures = evaluate_items(read_tasks(path, limit), scorer, config.data.answer_checker)
    results.update({f"tasks/{name}/{k}": v for k, v in figures.items()})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, TASK_RESULTS), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results

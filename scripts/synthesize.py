r"""Synthetic data from a model: sampled replies, scored, kept as SFT records or preference pairs.

  python -m scripts.synthesize --workdir runs/sft_tiny --prompts prompts.jsonl \
      --output synth_sft.jsonl --mode sft --samples 4 --reward tiny_answer --threshold 1
  python -m scripts.synthesize --workdir runs/sft_tiny --prompts prompts.jsonl \
      --output synth_pairs.jsonl --mode preferences --samples 4 --reward_model runs/reward_tiny

The tiny world's prompts ({prompt, answer} records), then --prompts
runs/data/tiny_prompts-train.jsonl:

  python -c "from data.tiny_tasks import ensure_tiny_tasks; \
      ensure_tiny_tasks('runs/data', 'prompts', 2000, 200)"

For every prompt of `--prompts` (JSONL "Prompts only" records, docs/formats.md) the run's latest
checkpoint samples `--samples` replies (chat template `--chat_template`, stopped at its end of
turn), each scored by `--reward` (a function of data/verifiers.py, on the reply and the
record's `answer`; `answer` scores with `--answer_checker`) and / or `--reward_model` (a
reward-model run: its score at the last token), minus `--missing_stop_penalty` when a reply
ran out of tokens. Output, in the formats the data
pipeline reads:

  --mode sft           per prompt, up to `--keep` distinct replies scoring >= `--threshold`,
                       best first: Alpaca {instruction, output} (`--format alpaca`, prompts of
                       one user turn) or ShareGPT {conversations} (`--format sharegpt`)
  --mode preferences   per prompt, the best reply against the worst when their scores differ
                       by more than `--min_margin`: {prompt, chosen, rejected} (`prompt` as
                       given: a text or turns)

A summary line reports prompts, samples, mean score, pass rate and records written.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from configs.cli import parse_flags
from data.conversation import Prompt, Turn
from data.verifiers import get_answer_checker, get_reward_function
from models.sampler import PROMPT_BUCKET, Sampler, left_pad
from parallel.host_data import batch_shards, to_global, to_host
from scripts.generate import (completion_text, define_sampling_flags, load_decoder,
                              prompt_tokens, read_prompts, stop_tokens)
from training.rl import rewards
from training.rl.rollout import build_rows

FLAGS = flags.FLAGS
MODES = ("sft", "preferences")
RECORD_FORMATS = ("alpaca", "sharegpt")


def define_flags() -> None:
  define_sampling_flags(default_template="default")
  FLAGS.set_default("temperature", 1.0)
  flags.DEFINE_string("prompts", None, "JSONL file(s) of {\"prompt\", \"answer\"?} records.")
  flags.DEFINE_string("output", None, "Where to write the records (JSONL).")
  flags.DEFINE_enum("mode", "sft", MODES, "SFT records or preference pairs.")
  flags.DEFINE_enum("format", "alpaca", RECORD_FORMATS, "SFT record format.")
  flags.DEFINE_integer("samples", 4, "Replies sampled per prompt.")
  flags.DEFINE_string("reward", "tiny_answer", "Reward function (data/verifiers.py: "
                      "tiny_answer | exact_answer | answer); '' for none.")
  flags.DEFINE_string("answer_checker", "tiny_world", "Answer check of --reward answer "
                      "(data/verifiers.py: tiny_world | exact | package.module:function).")
  flags.DEFINE_string("reward_model", "", "Reward-model run scoring the replies ('' = none).")
  flags.DEFINE_float("missing_stop_penalty", 1.0, "Subtracted when a reply did not stop.")
  flags.DEFINE_float("threshold", 1.0, "--mode sft: lowest score kept.")
  flags.DEFINE_integer("keep", 1, "--mode sft: distinct replies kept per prompt at most.")
  flags.DEFINE_float("min_margin", 0.0, "--mode preferences: best - worst must exceed it.")
  flags.DEFINE_integer("batch_size", 16, "Prompts sampled at once.")


def sft_record(prompt: Any, context: Sequence, reply: str, record_format: str) -> dict:
  """An Alpaca or ShareGPT record of `context` answered by `reply`."""
  if record_format == "alpaca":
    if len(context) != 1 or context[0].role != "user":
      raise ValueError("--format alpaca needs prompts of one user turn; use --format sharegpt")
    return {"instruction": context[0].content, "output": reply}
  names = {"system": "system", "user": "human", "assistant": "gpt"}
  turns = [{"from": names[t.role], "value": t.content} for t in context]
  return {"conversations": turns + [{"from": "gpt", "value": reply}]}


def select_records(prompt: Any, context: Sequence, replies: Sequence[str],
                   scores: Sequence[float], *, mode: str, record_format: str = "alpaca",
                   threshold: float = 1.0, keep: int = 1, min_margin: float = 0.0
                   ) -> list[dict]:
  """The records one prompt's scored replies give (see the module docstring)."""
  order = sorted(range(len(replies)), key=lambda i: -scores[i])  # stable: ties keep order
  if mode == "preferences":
    best, worst = order[0], order[-1]
    if scores[best] - scores[worst] <= min_margin or replies[best] == replies[worst]:
      return []
    return [{"prompt": prompt, "chosen": replies[best], "rejected": replies[worst]}]
  out, seen = [], set()
  for i in order:
    if scores[i] < threshold or len(out) == keep:
      break
    if replies[i].strip() and replies[i] not in seen:
      seen.add(replies[i])
      out.append(sft_record(prompt, context, replies[i], record_format))
  return out


def synthesize(model, prompts_path: str, output_path: str, *, mode: str = "sft",
               record_format: str = "alpaca", samples: int = 4, reward: str = "tiny_answer",
               reward_model: str = "", missing_stop_penalty: float = 1.0,
               threshold: float = 1.0, keep: int = 1, min_margin: float = 0.0,
               max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
               chat_template: str = "default", answer_checker: str = "tiny_world"
               ) -> dict[str, float]:
  """Writes the synthetic records; returns a summary. `model`: a training/runs.py LoadedModel
  (scripts/generate.py `load_decoder`)."""
  if mode not in MODES or record_format not in RECORD_FORMATS:
    raise ValueError(f"mode must be one of {MODES} and format one of {RECORD_FORMATS}")
  if chat_template == "none":
    raise ValueError("synthesis renders conversations: use --chat_template default or chatml")
  reward_fn = get_reward_function(reward, get_answer_checker(answer_checker,
                                                             key="--answer_checker"))
  scorer = (rewards.RewardModelScorer.from_run(reward_model, model.mesh, model.rules)
            if reward_model else None)
  if reward_fn is None and scorer is None:
    raise ValueError("set --reward and / or --reward_model")
  tok, stops = model.tokenizer, stop_tokens(model.tokenizer, chat_template)
  records = list(read_prompts(prompts_path, chat_template))
  rng = jax.random.PRNGKey(seed)
  sampler = Sampler(model.spec, model.mesh, model.rules)
  totals = dict(prompts=0, samples=0, score=0.0, passed=0, records=0)
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "w", encoding="utf-8") as out:
    for start in range(0, len(records), batch_size):
      batch = records[start:start + batch_size]
      ids = [prompt_tokens(tok, r["context"], chat_template) for r in batch]
      rows_ids = [p for p in ids for _ in range(samples)]
      result = sampler.generate(model.params, rows_ids, max_new_tokens=max_new_tokens,
                                eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=stops,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                rng=jax.random.fold_in(rng, start))
      replies, stopped = [], []
      for row, n in zip(result.tokens, result.lengths):
        ids_row = row[:n].tolist()
        stopped.append(bool(ids_row) and ids_row[-1] in stops)
        replies.append(completion_text(tok, ids_row, stops))
      prompts = [Prompt(tuple(r["context"]), r["answer"]) for r in batch for _ in range(samples)]
      scores = rewards.stop_penalties(np.array(stopped), missing_stop_penalty)
      if reward_fn is not None:
        scores = scores + rewards.function_scores(reward_fn, replies, prompts)
      if scorer is not None:
        length = PROMPT_BUCKET * math.ceil(max(map(len, rows_ids)) / PROMPT_BUCKET)
        padded, lengths = left_pad(rows_ids, length, tok.pad_id)
        rows = build_rows(padded, lengths, result.tokens, result.mask)
        scores = scores + _score_padded(scorer, rows, model)
      for i, record in enumerate(batch):
        part = slice(i * samples, (i + 1) * samples)
        context = record["context"]
        context = (Turn("user", context),) if isinstance(context, str) else tuple(context)
        chosen = select_records(record["prompt"], context, replies[part],
                                [float(s) for s in scores[part]], mode=mode,
                                record_format=record_format, threshold=threshold, keep=keep,
                                min_margin=min_margin)
        for line in chosen:
          out.write(json.dumps(line, ensure_ascii=False) + "\n")
        totals["records"] += len(chosen)
      totals["prompts"] += len(batch)
      totals["samples"] += len(replies)
      totals["score"] += float(np.sum(scores))
      totals["passed"] += int(np.sum(scores >= threshold))
  return {"prompts": totals["prompts"], "samples": totals["samples"],
          "mean_score": totals["score"] / max(totals["samples"], 1),
          "pass_rate": totals["passed"] / max(totals["samples"], 1),
          "records": totals["records"]}


def _score_padded(scorer, rows, model):
  """Reward-model scores of `rows`, the batch filled up (copies of row 0) to split evenly
  over the mesh."""
  n = len(rows["tokens"])
  fill = -n % batch_shards(model.mesh, model.rules)
  padded = {k: np.concatenate([v, np.repeat(v[:1], fill, axis=0)]) for k, v in rows.items()}
  return to_host(scorer(to_global(padded, model.mesh, model.rules)))[:n]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("workdir", "prompts", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  logging.set_verbosity(logging.INFO)
  summary = synthesize(
      load_decoder(FLAGS.workdir), FLAGS.prompts, FLAGS.output, mode=FLAGS.mode,
      record_format=FLAGS.format, samples=FLAGS.samples, reward=FLAGS.reward,
      reward_model=FLAGS.reward_model, missing_stop_penalty=FLAGS.missing_stop_penalty,
      threshold=FLAGS.threshold, keep=FLAGS.keep, min_margin=FLAGS.min_margin,
      max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
      chat_template=FLAGS.chat_template, answer_checker=FLAGS.answer_checker)
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

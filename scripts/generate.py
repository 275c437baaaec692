r"""Generate completions for a file of prompts with a trained run's latest checkpoint.

  python -m scripts.generate --workdir runs/sft_tiny --prompts prompts.jsonl \
      --output completions.jsonl [--max_new_tokens 64 --temperature 0 --top_k 0 --top_p 1 \
      --seed 0 --batch_size 16 --chat_template none|default|chatml]

Input: JSONL in the "Prompts only" format (docs/formats.md): `{"prompt": "...", "answer": "..."}`,
`prompt` a text or (with a chat template) a list of ShareGPT turns ending with the user's. A bad
line is an error naming file:line. Output: one JSON line per prompt, in input order,

  {"prompt": <as given>, "completion": text, "tokens": [generated ids], "logprob": float}

(`answer` copied when given). `tokens` include the stop token (EOS or the template's end of
turn) when the row stopped, `completion` is their text without it, and `logprob` is the sum of
their log-probs under the model's unmodified (temperature-1) distribution.

The run's `config.json` gives the model (missing fields take today's defaults), the mesh and
the tokenizer (`config.data.tokenizer`, else the run's `tokenizer/spm.model` or a converted
model's `tokenizer/tokenizer.json`); training/runs.py loads it. A LoRA run is merged into its
base (`init_from`). `--temperature 0` is greedy, so a rerun is identical.

Bad settings (`--max_new_tokens 0`, `--top_p 0`, ...) are one `error: ...` line before the
model loads; the output appears only when complete (a failed run leaves an earlier one as it
was). With learned positions a prompt longer than `max_length - max_new_tokens` tokens keeps
its first token and its end (logged, and counted in the printed line).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Iterator, Sequence

import jax
from absl import app, flags, logging

from configs.cli import parse_flags
from configs.run_layout import read_run_config
from data.chat_template import render_prompt, stop_ids
from data.conversation import Turn, parse_prompt
from data.prompts import fit_prompt
from data.records import InvalidRecord, RecordError, iter_jsonl_records
from models.sampler import Sampler
from training.runs import LoadedModel, load_model, run_model_kind

TEMPLATES = ("none", "default", "chatml")

FLAGS = flags.FLAGS


def define_sampling_flags(default_template: str = "none") -> None:
  """Flags shared with scripts/chat.py; defined when a script runs, not on import, so both
  scripts can use this module."""
  flags.DEFINE_string("workdir", None, "Training run to load (its latest checkpoint).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per reply at most.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling probability mass (1: all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_enum("chat_template", default_template, TEMPLATES,
                    "Render prompts with a chat template (data/chat_template.py) and stop at "
                    "its end-of-turn token; 'none': raw text.")


def define_flags() -> None:
  define_sampling_flags()
  flags.DEFINE_string("prompts", None, "JSONL file of {\"prompt\": ...} records.")
  flags.DEFINE_string("output", None, "Where to write the completions (JSONL).")
  flags.DEFINE_integer("batch_size", 16, "Prompts generated at once.")


def load_decoder(workdir: str) -> LoadedModel:
  """The latest params of the run in `workdir` as a decoder, sharded on the run's own mesh
  (training/runs.py `load_model`; a LoRA run merged into its base). An RL policy loads as
  its decoder (the value head is not read); encoders and reward models cannot generate.
  """
  kind = run_model_kind(read_run_config(workdir))
  if kind != "decoder":
    raise ValueError(f"{workdir} holds a {kind!r} model; only decoders generate text")
  return load_model(workdir, kind="decoder")


def prompt_tokens(tokenizer, prompt, template: str, add_bos: bool = True) -> list[int]:
  """Token ids of a prompt: raw text (`template='none'`) or a rendered chat context.

  Args:
    prompt: a text, or a conversation (a sequence of data.conversation.Turn ending with the
      user's) for a chat template.
  """
  if template == "none":
    if not isinstance(prompt, str):
      raise ValueError("a prompt given as turns needs a chat template (--chat_template)")
    return tokenizer.encode(prompt, add_bos=add_bos)
  turns = (Turn("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
  return render_prompt(tokenizer, turns, template, add_bos=add_bos)


def stop_tokens(tokenizer, template: str) -> list[int]:
  """EOS, plus the template's end-of-turn token."""
  if template == "none":
    return [tokenizer.eos_id]
  return sorted(set(stop_ids(tokenizer, template)) | {tokenizer.eos_id})


def completion_text(tokenizer, tokens: Sequence[int], stops: Sequence[int]) -> str:
  """Text of generated `tokens` (already cut at the row's length) without the stop token."""
  tokens = list(tokens)
  if tokens and tokens[-1] in stops:
    tokens = tokens[:-1]
  return tokenizer.decode(tokens)


def read_prompts(path: str, template: str) -> Iterator[dict]:
  """Yields `{"prompt", "answer", "context"}` per line of a prompts JSONL file.

  Raises:
    RecordError: a malformed line (file:line), or turns given with `template='none'`.
  """

  def validate(obj):
    parsed = parse_prompt(obj)
    if template == "none" and not isinstance(obj["prompt"], str):
      raise InvalidRecord("needs_template", "a prompt given as turns needs --chat_template "
                          "default or chatml")
    context = obj["prompt"] if template == "none" else parsed.context
    return {"prompt": obj["prompt"], "answer": parsed.answer, "context": context}

  yield from iter_jsonl_records(path, validate)


def check_settings(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   batch_size: int) -> None:
  """Raises ValueError, one line naming every bad setting, before anything is read or written."""
  problems = [text for bad, text in [
      (max_new_tokens < 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
      (temperature < 0, f"temperature must be >= 0, got {temperature}"),
      (top_k < 0, f"top_k must be >= 0, got {top_k}"),
      (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
      (batch_size < 1, f"batch_size must be >= 1, got {batch_size}")] if bad]
  if problems:
    raise ValueError("; ".join(problems))


def prompt_budget(model_config, max_new_tokens: int) -> int | None:
  """Prompt tokens that fit before `max_new_tokens` new ones, or None for no limit.

  Only learned positions have a table that ends (`model.max_length`); the sampler refuses a
  prompt that runs past it, so such prompts are cut here instead, keeping BOS and the end
  (data/prompts.py `fit_prompt`, as RL does): the question and the assistant header are last.
  """
  if model_config.get("position") != "learned":
    return None
  budget = model_config.max_length - max_new_tokens
  if budget < 2:
    raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in "
                     f"config.model.max_length {model_config.max_length} (learned positions)")
  return budget


@dataclasses.dataclass(frozen=True)
class Generated:
  count: int        # completions written, one per prompt
  truncated: int    # prompts cut (oldest tokens first) to fit the model's context


def generate_file(model: LoadedModel, prompts_path: str, output_path: str, *,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                  chat_template: str = "none") -> Generated:
  """Writes one completion per prompt of `prompts_path` to `output_path`.

  Every batch is filled up to `batch_size` (copies of its first prompt, dropped), so all
  batches of one prompt-length bucket share one compiled sampler. The settings are checked
  before anything is read, and the output is written to a temporary file in its folder that
  replaces `output_path` only when complete: a failure leaves an earlier output as it was.

  Returns:
    How many completions were written, and how many prompts were cut to fit the context (a
    warning is logged for each).
  """
  check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, batch_size=batch_size)
  if chat_template not in TEMPLATES:
    raise ValueError(f"unknown chat template {chat_template!r}; choose one of {TEMPLATES}")
  budget = prompt_budget(model.spec.config, max_new_tokens)
  tok = model.tokenizer
  add_bos = bool(model.config.data.get("add_bos", True)) if "data" in model.config else True
  stops = stop_tokens(tok, chat_template)
  records = list(read_prompts(prompts_path, chat_template))
  rng = jax.random.PRNGKey(seed)
  sampler = Sampler(model.spec, model.mesh, model.rules)
  count = truncated = 0
  folder = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(output_path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as out:
      for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        ids = [prompt_tokens(tok, r["context"], chat_template, add_bos) for r in batch]
        if budget is not None:
          for i, prompt in enumerate(ids):
            if len(prompt) > budget:
              logging.warning("%s: prompt %d has %d tokens; kept its first and last %d to fit "
                              "config.model.max_length %d with max_new_tokens %d",
                              prompts_path, start + i + 1, len(prompt), budget - 1,
                              model.spec.config.max_length, max_new_tokens)
              ids[i] = fit_prompt(prompt, budget)
              truncated += 1
        ids += [ids[0]] * (batch_size - len(ids))
        result = sampler.generate(model.params, ids, max_new_tokens=max_new_tokens,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=stops,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  rng=jax.random.fold_in(rng, start))
        for i, record in enumerate(batch):
          tokens = result.tokens[i, :result.lengths[i]].tolist()
          line = {"prompt": record["prompt"], "completion": completion_text(tok, tokens, stops),
                  "tokens": tokens, "logprob": float(result.log_probs[i].sum())}
          if record["answer"] is not None:
            line["answer"] = record["answer"]
          out.write(json.dumps(line, ensure_ascii=False) + "\n")
          count += 1
    os.replace(tmp, output_path)
  except BaseException:
    os.remove(tmp)
    raise
  return Generated(count, truncated)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("workdir", "prompts", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  settings = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                  top_k=FLAGS.top_k, top_p=FLAGS.top_p, batch_size=FLAGS.batch_size)
  try:
    check_settings(**settings)  # before the model loads: a typo costs no minutes
  except ValueError as e:
    sys.exit(f"error: {e}")
  logging.set_verbosity(logging.INFO)
  model = load_decoder(FLAGS.workdir)
  try:
    done = generate_file(model, FLAGS.prompts, FLAGS.output, seed=FLAGS.seed,
                         chat_template=FLAGS.chat_template, **settings)
  except (RecordError, ValueError) as e:
    sys.exit(f"error: {e}")
  cut = (f" ({done.truncated} prompt{'s' * (done.truncated > 1)} cut to fit the context)"
         if done.truncated else "")
  print(f"Wrote {done.count} completions to {FLAGS.output}{cut}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

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
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import jax
from absl import app, flags, logging

from configs.cli import parse_flags
from configs.run_layout import read_run_config
from data.chat_template import render_prompt, stop_ids
from data.conversation import Turn, parse_prompt
from data.records import InvalidRecord, iter_jsonl_records
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


def generate_file(model: LoadedModel, prompts_path: str, output_path: str, *,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                  chat_template: str = "none") -> int:
  """Writes one completion per prompt of `prompts_path` to `output_path`; returns the count.

  Every batch is filled up to `batch_size` (copies of its first prompt, dropped), so all
  batches of one prompt-length bucket share one compiled sampler.
  """
  if chat_template not in TEMPLATES:
    raise ValueError(f"unknown chat template {chat_template!r}; choose one of {TEMPLATES}")
  tok = model.tokenizer
  add_bos = bool(model.config.data.get("add_bos", True)) if "data" in model.config else True
  stops = stop_tokens(tok, chat_template)
  records = list(read_prompts(prompts_path, chat_template))
  rng = jax.random.PRNGKey(seed)
  sampler = Sampler(model.spec, model.mesh, model.rules)
  count = 0
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "w", encoding="utf-8") as out:
    for start in range(0, len(records), batch_size):
      batch = records[start:start + batch_size]
      ids = [prompt_tokens(tok, r["context"], chat_template, add_bos) for r in batch]
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
  return count


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("workdir", "prompts", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  logging.set_verbosity(logging.INFO)
  model = load_decoder(FLAGS.workdir)
  count = generate_file(model, FLAGS.prompts, FLAGS.output, max_new_tokens=FLAGS.max_new_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                        chat_template=FLAGS.chat_template)
  print(f"Wrote {count} completions to {FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

r"""Generate completions for a file of prompts with a trained run's latest checkpoint.

  python -m scripts.generate --workdir runs/sft_tiny --prompts prompts.jsonl \
      --output completions.jsonl [--max_new_tokens 64 --temperature 0 --top_k 0 --top_p 1 \
      --seed 0 --batch_size 16 --chat_template none|default|chatml]

Input: JSONL in the "Prompts only" format (FORMATS.md): `{"prompt": "...", "answer": "..."}`,
`prompt` a text or (with a chat template) a list of ShareGPT turns ending with the user's. A bad
line is an error naming file:line. Output: one JSON line per prompt, in input order,

  {"prompt": <as given>, "completion": text, "tokens": [generated ids], "logprob": float}

(`answer` copied when given). `tokens` include the stop token (EOS or the template's end of
turn) when the row stopped, `completion` is their text without it, and `logprob` is the sum of
their log-probs under the model's unmodified (temperature-1) distribution.

The run's `config.json` gives the model (missing fields take today's defaults), the mesh and
the tokenizer (`config.data.tokenizer`, else the run's `tokenizer/spm.model`). A LoRA run is
merged into its base (`init_from`). `--temperature 0` is greedy, so a rerun is identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

from absl import app, flags, logging

from configs.cli import parse_flags

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


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """What generation needs from a run: its config, model, params, tokenizer and mesh."""
  config: Any
  spec: Any
  params: Any
  tokenizer: Any
  mesh: Any
  rules: Any


def tokenizer_path(workdir: str, config) -> str:
  """`config.data.tokenizer` when set, else the run's own `tokenizer/spm.model`."""
  configured = config.data.get("tokenizer", "") if "data" in config else ""
  path = configured or os.path.join(workdir, "tokenizer", "spm.model")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer {path} not found (set in {workdir}/config.json "
                            "data.tokenizer, or the run's tokenizer/spm.model)")
  return path


def load_model(workdir: str) -> LoadedModel:
  """Restores the latest params of the run in `workdir`, sharded on the run's own mesh."""
  import jax

  import models  # noqa: F401  (flax variable-sharding mode)
  from data.tokenizer import Tokenizer
  from models import lora as lora_lib
  from models.build import build_model_spec
  from models.convert.hf_export import load_run_config, run_kind
  from parallel.mesh import make_mesh
  from parallel.rules import get_rules, tree_shardings
  from training.checkpoint import Checkpointer

  config = load_run_config(workdir)
  kind = run_kind(config)
  if kind in ("encoder", "reward"):
    raise ValueError(f"{workdir} holds a {kind!r} model; only decoders generate text")
  mesh, rules = make_mesh(config.mesh), get_rules(config.mesh.rules)
  # Restored as a plain decoder whatever the stage's kind (e.g. an RL policy with a value
  # head): the partial restore reads the decoder's params and ignores the rest.
  spec = build_model_spec(config.model, "decoder")

  def target(shapes, axes):
    shardings = tree_shardings(axes, shapes, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)

  if lora_lib.is_enabled(config):
    lora = lora_lib.make_lora_spec(spec, config.lora)
    base = Checkpointer.restore_params(config.init_from, target(spec.shapes, spec.logical_axes))
    adapters = Checkpointer.restore_params(workdir, target(lora.shapes, lora.logical_axes))
    params = jax.jit(lambda b, a: lora_lib.merge_lora(b, a, lora))(base, adapters)
  else:
    params = Checkpointer.restore_params(workdir, target(spec.shapes, spec.logical_axes))
  tokenizer = Tokenizer.load(tokenizer_path(workdir, config))
  return LoadedModel(config, spec, params, tokenizer, mesh, rules)


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
  from data.chat_template import render_prompt
  from data.conversation import Turn
  turns = (Turn("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
  return render_prompt(tokenizer, turns, template, add_bos=add_bos)


def stop_tokens(tokenizer, template: str) -> list[int]:
  """EOS, plus the template's end-of-turn token."""
  if template == "none":
    return [tokenizer.eos_id]
  from data.chat_template import stop_ids
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
  from data.conversation import parse_prompt
  from data.records import InvalidRecord, iter_jsonl_records

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
  import jax

  from models.sampler import generate

  if chat_template not in TEMPLATES:
    raise ValueError(f"unknown chat template {chat_template!r}; choose one of {TEMPLATES}")
  tok = model.tokenizer
  add_bos = bool(model.config.data.get("add_bos", True)) if "data" in model.config else True
  stops = stop_tokens(tok, chat_template)
  records = list(read_prompts(prompts_path, chat_template))
  rng = jax.random.PRNGKey(seed)
  count = 0
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "w", encoding="utf-8") as out:
    for start in range(0, len(records), batch_size):
      batch = records[start:start + batch_size]
      ids = [prompt_tokens(tok, r["context"], chat_template, add_bos) for r in batch]
      ids += [ids[0]] * (batch_size - len(ids))
      result = generate(model.spec, model.params, ids, max_new_tokens=max_new_tokens,
                        eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=stops,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        rng=jax.random.fold_in(rng, start), mesh=model.mesh, rules=model.rules)
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
  model = load_model(FLAGS.workdir)
  count = generate_file(model, FLAGS.prompts, FLAGS.output, max_new_tokens=FLAGS.max_new_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                        chat_template=FLAGS.chat_template)
  print(f"Wrote {count} completions to {FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

"""SFT / instruction tuning: packed chat-template conversations, loss on assistant tokens only.

  loss_fn       one forward pass over the packed batch -> objectives/sft.py (clm_loss under the
                chat template's loss mask; token- or example-normalised).
  make_dataset  data/sft.py: records -> conversations -> tokens + mask -> truncate -> pack.
  evaluate      greedy generation (models/sampler.py) on held-out prompts rendered with the
                run's chat template, stopped at the template's end-of-turn token:
                  eval/answer_accuracy  reply states the reference answer
                                        (data/tiny_tasks.answer_correct)
                  eval/exact_match      reply equals the reference reply (whitespace aside)
                  eval/stop_rate        reply ended with the end-of-turn / EOS token
                over `config.eval.num_prompts` held-out prompts: `config.eval.prompt_files`
                ({prompt, answer} records) if set, else for the tiny world its distinct
                validation questions, else the eval split's conversations (reply = the last
                assistant turn, exact match only).

`evaluate_checkpoint(config, path)` scores any run's checkpoint the same way, e.g. the base
model an SFT run starts from.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import ml_collections

from data import chat_template
from data import sft as sft_data
from data import tiny_tasks
from data.conversation import Conversation, Turn, read_records
from models import sampler
from objectives.sft import sft_loss
from training.stages import Stage


def sft_forward(model, batch, rng, cfg: ml_collections.ConfigDict, frozen):
  """SFT loss on a packed batch {inputs, targets, loss_mask, segment_ids, positions}."""
  del rng, frozen
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  return sft_loss(logits, batch["targets"], batch["loss_mask"], batch["segment_ids"],
                  normalize=cfg.get("normalize", "token"), z_loss=cfg.z_loss)


def make_dataset(config, tokenizer, **kwargs):
  return sft_data.make_sft_dataset(config.data, tokenizer, **kwargs)


# --- Held-out generation ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HeldOut:
  """A held-out prompt: `context` ends with a user turn."""
  context: Conversation
  answer: str | None = None      # short answer a correct reply states (answer_accuracy)
  reference: str | None = None   # the whole reference reply (exact_match)


def held_out_prompts(config: ml_collections.ConfigDict, workdir: str | None = None
                     ) -> list[HeldOut]:
  """The first `config.eval.num_prompts` held-out prompts (see the module docstring)."""
  num = config.eval.num_prompts
  if config.eval.prompt_files:
    prompts = read_records(config.eval.prompt_files, "prompts")
    return [HeldOut(p.context, p.answer) for _, p in zip(range(num), prompts)]
  if config.data.source == "tiny_world":
    # Distinct questions: the validation split repeats its few dozen templates' instances.
    unique = {q.text: q for q in tiny_tasks.questions("validation", 40 * num)}
    return [HeldOut((Turn("user", q.text),), q.answer, q.response)
            for q in list(unique.values())[:num]]
  items = []
  for conversation in sft_data.load_conversations(config.data, "eval", workdir)[:num]:
    last = max(i for i, t in enumerate(conversation) if t.role == "assistant")
    items.append(HeldOut(tuple(conversation[:last]), None, conversation[last].content))
  return items


@functools.lru_cache(maxsize=4)
def _cached_prompts(config: ml_collections.FrozenConfigDict, workdir: str | None) -> tuple:
  return tuple(held_out_prompts(config, workdir))


def _same_text(a: str, b: str) -> bool:
  return a.split() == b.split()


def score_replies(replies: Sequence[str], stopped: Sequence[bool],
                  items: Sequence[HeldOut]) -> dict[str, float]:
  """Mean answer accuracy / exact match / stop rate over the items that have each."""
  answered = [tiny_tasks.answer_correct(r, it.answer) for r, it in zip(replies, items)
              if it.answer is not None]
  exact = [_same_text(r, it.reference) for r, it in zip(replies, items)
           if it.reference is not None]
  metrics = {"eval/stop_rate": sum(stopped) / max(len(stopped), 1)}
  if answered:
    metrics["eval/answer_accuracy"] = sum(answered) / len(answered)
  if exact:
    metrics["eval/exact_match"] = sum(exact) / len(exact)
  return metrics


def generate_replies(ctx, prompts: Sequence[Sequence[int]], *, generate: Callable | None = None
                     ) -> tuple[list[str], list[bool]]:
  """Greedy replies to rendered prompts, decoded without their stop token, and whether each
  stopped (rather than running out of `config.eval.max_new_tokens`)."""
  generate = sampler.generate if generate is None else generate
  tok, cfg = ctx.tokenizer, ctx.config
  stops = chat_template.stop_ids(tok, cfg.data.chat_template)
  replies, stopped = [], []
  for start in range(0, len(prompts), cfg.eval.batch_size):
    out = generate(ctx.spec, ctx.params, [list(p) for p in prompts[start:start +
                                                                     cfg.eval.batch_size]],
                   max_new_tokens=cfg.eval.max_new_tokens, eos_id=tok.eos_id,
                   pad_id=tok.pad_id, stop_ids=stops, temperature=0.0, mesh=ctx.mesh,
                   rules=ctx.rules)
    for row, length in zip(out.tokens, out.lengths):
      ids = [int(t) for t in row[:int(length)]]
      ended = bool(ids) and ids[-1] in stops
      replies.append(tok.decode(ids[:-1] if ended else ids))
      stopped.append(ended)
  return replies, stopped


def evaluate(ctx, *, generate: Callable | None = None) -> dict[str, float]:
  """Held-out generation metrics of `ctx.params` (a training/loop.py EvalContext).

  `generate` defaults to `models.sampler.generate` (same signature); tests pass a stand-in.
  """
  items = _cached_prompts(ml_collections.FrozenConfigDict(ctx.config), ctx.workdir or None)
  if not items:
    raise ValueError("no held-out prompts to evaluate")
  template = ctx.config.data.chat_template
  prompts = [chat_template.render_prompt(ctx.tokenizer, it.context, template) for it in items]
  replies, stopped = generate_replies(ctx, prompts, generate=generate)
  return score_replies(replies, stopped, items)


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str,
                        workdir: str | None = None) -> dict[str, float]:
  """`evaluate` on the params of any run (workdir, checkpoints dir or step dir) with that run's
  own tokenizer (else `config.data.tokenizer`): e.g. the base model of an SFT run.

  python -c "from configs import sft; from training.stages.sft import evaluate_checkpoint; \\
      print(evaluate_checkpoint(sft.get_config('tiny'), 'runs/pretrain_tiny'))"
  """
  import models  # noqa: F401  (flax's sharding mode, as in training/loop.py)
  from configs.base import run_dir
  from data.tokenizer import Tokenizer
  from models.build import build_model_spec
  from parallel.mesh import make_mesh
  from parallel.rules import get_rules, tree_shardings
  from training.checkpoint import Checkpointer
  from training.loop import EvalContext

  mesh, rules = make_mesh(config.mesh), get_rules(config.mesh.rules)
  own = os.path.join(run_dir(path), "tokenizer", "spm.model")
  if not (os.path.exists(own) or config.data.tokenizer):
    raise FileNotFoundError(f"{own} not found; set config.data.tokenizer")
  tokenizer = Tokenizer.load(own if os.path.exists(own) else config.data.tokenizer)
  spec = build_model_spec(config.model)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        spec.shapes, tree_shardings(spec.logical_axes, spec.shapes, mesh, rules))
  params = Checkpointer.restore_params(path, target)
  return evaluate(EvalContext(config, tokenizer, spec, params, mesh, rules, workdir or ""))


STAGE = Stage(name="sft", loss_fn=sft_forward, make_dataset=make_dataset, evaluate=evaluate)

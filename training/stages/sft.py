"""SFT / instruction tuning: packed chat-template conversations, loss on assistant tokens only.

  loss_fn       one forward pass over the packed batch -> objectives/sft.py (clm_loss under the
                chat template's loss mask; token- or example-normalised).
  make_dataset  data/sft.py: records -> conversations -> tokens + mask -> truncate -> pack.
  evaluator     greedy generation (models/sampler.py) on held-out prompts rendered with the
                run's chat template, stopped at the template's end-of-turn token:
                  eval/answer_accuracy  reply states the reference answer (the run's
                                        config.data.answer_checker, data/verifiers.py)
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
from typing import Callable, Sequence

import ml_collections

from data import chat_template
from data import sft as sft_data
from data import tiny_tasks, verifiers
from data.conversation import Conversation, Turn, read_records
from models import sampler
from objectives.sft import sft_loss
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.batch_shapes import packed_rows
from training.runs import load_model
from training.stage import EvalContext, Stage


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


def _same_text(a: str, b: str) -> bool:
  return a.split() == b.split()


def score_replies(replies: Sequence[str], stopped: Sequence[bool], items: Sequence[HeldOut],
                  answer_check: verifiers.AnswerChecker) -> dict[str, float]:
  """Mean answer accuracy (`answer_check(reply, answer)`) / exact match / stop rate over the
  items that have each."""
  answered = [bool(answer_check(r, it.answer)) for r, it in zip(replies, items)
              if it.answer is not None]
  exact = [_same_text(r, it.reference) for r, it in zip(replies, items)
           if it.reference is not None]
  metrics = {"eval/stop_rate": sum(stopped) / max(len(stopped), 1)}
  if answered:
    metrics["eval/answer_accuracy"] = sum(answered) / len(answered)
  if exact:
    metrics["eval/exact_match"] = sum(exact) / len(exact)
  return metrics


class GenerationEvaluator:
  """`Stage.make_evaluator`: held-out generation metrics (see the module docstring).

  Built once per run: it reads and renders the held-out prompts once, resolves the run's answer
  checker once and keeps one `models.sampler.Sampler`, whose compiled sampler every evaluation
  reuses. `generate` (default: that sampler's `generate`) is a stand-in hook for tests.
  """

  def __init__(self, ctx: EvalContext, *, generate: Callable | None = None):
    self.ctx = ctx
    self.items = held_out_prompts(ctx.config, ctx.workdir or None)
    if not self.items:
      raise ValueError("no held-out prompts to evaluate")
    template = ctx.config.data.chat_template
    self.prompts = [chat_template.render_prompt(ctx.tokenizer, it.context, template)
                    for it in self.items]
    self.stops = chat_template.stop_ids(ctx.tokenizer, template)
    self.answer_check = verifiers.get_answer_checker(ctx.config.data.answer_checker)
    self.generate = generate or sampler.Sampler(ctx.spec, ctx.mesh, ctx.rules).generate

  def replies(self, params) -> tuple[list[str], list[bool]]:
    """Greedy replies to the prompts, decoded without their stop token, and whether each
    stopped (rather than running out of `config.eval.max_new_tokens`)."""
    tok, cfg = self.ctx.tokenizer, self.ctx.config
    replies, stopped = [], []
    for start in range(0, len(self.prompts), cfg.eval.batch_size):
      batch = [list(p) for p in self.prompts[start:start + cfg.eval.batch_size]]
      out = self.generate(params, batch, max_new_tokens=cfg.eval.max_new_tokens,
                          eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=self.stops,
                          temperature=0.0)
      for row, length in zip(out.tokens, out.lengths):
        ids = [int(t) for t in row[:int(length)]]
        ended = bool(ids) and ids[-1] in self.stops
        replies.append(tok.decode(ids[:-1] if ended else ids))
        stopped.append(ended)
    return replies, stopped

  def __call__(self, params) -> dict[str, float]:
    replies, stopped = self.replies(params)
    return score_replies(replies, stopped, self.items, self.answer_check)


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str,
                        workdir: str | None = None) -> dict[str, float]:
  """The SFT evaluation of any run's params (workdir, checkpoints dir or step dir; a LoRA run
  merged) with that run's own tokenizer: e.g. the base model an SFT run starts from.

  python -c "from configs import sft; from training.stages.sft import evaluate_checkpoint; \\
      print(evaluate_checkpoint(sft.get_config('tiny'), 'runs/pretrain_tiny'))"
  """
  mesh = make_mesh(config.mesh)
  model = load_model(path, model_config=config.model, mesh=mesh,
                     rules=get_rules(config.mesh.rules))
  evaluator = GenerationEvaluator(EvalContext(config, model.tokenizer, model.spec, model.mesh,
                                              model.rules, workdir or ""))
  return evaluator(model.params)


def abstract_batch(config) -> dict:
  """`Stage.abstract_batch`: packed conversations (data/sft.py), loss mask on replies."""
  return packed_rows(config)


STAGE = Stage(name="sft", loss_fn=sft_forward, make_dataset=make_dataset,
              make_evaluator=GenerationEvaluator, abstract_batch=abstract_batch)

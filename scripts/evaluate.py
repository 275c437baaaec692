"""Evaluate a run's latest checkpoint on its held-out split (or on other files).

  python -m scripts.evaluate --workdir runs/pretrain_tiny
  python -m scripts.evaluate --workdir runs/pretrain_tiny --eval_files 'heldout/*.jsonl' \\
      --output runs/pretrain_tiny/eval_heldout.json
  python -m scripts.evaluate --workdir runs/tiny/sft --tasks tiny_world_mc,tiny_world_qa,arc.jsonl

The run's own config (`config.json`) decides the stage, model and data; the whole eval split
is read once (or `--max_batches`), and the stage's own evaluation (e.g. generation accuracy;
a classify run's whole-set task figures eval_task/*: accuracy and macro-F1, or MSE, Pearson
and Spearman) runs too. A LoRA run is evaluated as its adapters merged onto their base; an RL
run (PPO, GRPO, RLOO, online DPO) by its held-out rollouts (training/rl/evaluation.py), the
figures its eval iterations log. Metrics are printed and, with `--output`, written as JSON.

`--tasks FILE[,FILE]` scores the run on tasks instead (training/task_eval.py): multiple
choice by log-likelihood (acc, acc_norm), generation by an answer checker (greedy), perplexity
of text; written to `{workdir}/task_eval.json` too, which `scripts.report` shows.
"""

import json

import jax
from absl import app, flags, logging

from configs.cli import parse_flags
from configs.run_layout import read_run_config
from data.pipeline import resolve_tokenizer
from data.prompts import load_prompts
from training.evaluation import SplitEvaluator, stage_batches
from training.registry import get_stage
from training.rl.loop import RLTrainer
from training.runs import load_model, load_params
from training.setup import build_setup
from training.task_eval import evaluate_tasks
from training.stage import EvalContext


def evaluate_run(workdir: str, eval_files: str = "", max_batches: int = 0) -> dict[str, float]:
  """Held-out metrics of the latest checkpoint of the run in `workdir`."""
  config = read_run_config(workdir)
  if eval_files:
    with config.unlocked():
      config.data.source, config.data.eval_files = "files", eval_files
  stage = get_stage(config.objective.name)
  if stage.train is not None:  # an RL run: its held-out rollouts, as at its eval iterations
    return evaluate_rl_run(config, workdir)
  # A LoRA run is evaluated as the model it trained: adapters merged onto their base. Only
  # the latest checkpoint is evaluated, not also the model the run started from (eval.before).
  with config.unlocked():
    config.lora.enabled = False
    if "eval" in config and "before" in config.eval:
      config.eval.before = False
  setup = build_setup(config, stage)
  tokenizer = resolve_tokenizer(config.data, workdir)
  model = load_model(workdir, kind=stage.model_kind, mesh=setup.mesh, rules=setup.rules,
                     with_tokenizer=False)
  frozen = setup.load_frozen()
  eval_step = setup.eval_step(frozen, jax.tree.map(lambda a: a.sharding, model.params))
  evaluator = SplitEvaluator(
      eval_step, lambda: stage_batches(stage.make_dataset, config, tokenizer, split="eval",
                                       sharding=setup.data_sharding, workdir=workdir,
                                       num_epochs=1),
      steps=max_batches or 2 ** 31, sharding=setup.data_sharding,
      size=config.data.global_batch_size)
  metrics = evaluator(model.params, frozen.params)
  if stage.make_evaluator is not None:
    stage_evaluator = stage.make_evaluator(EvalContext(config, tokenizer, model.spec,
                                                       setup.mesh, setup.rules, workdir))
    metrics.update(stage_evaluator(model.params))
  return metrics


def evaluate_rl_run(config, workdir: str) -> dict[str, float]:
  """An RL run's held-out figures (training/rl/evaluation.py): greedy and sampled reward,
  answer accuracy and KL to the reference on its held-out prompts and on prompts it trains
  on, for the policy of its latest checkpoint."""
  tokenizer = resolve_tokenizer(config.data, workdir)
  train_items = load_prompts(config, tokenizer, "train", workdir)
  eval_items = load_prompts(config, tokenizer, "eval", workdir, distinct=True,
                            limit=config.eval.num_prompts)
  trainer = RLTrainer(config, tokenizer=tokenizer, train_items=train_items,
                      eval_items=eval_items)
  params = load_params(workdir, trainer.spec, trainer.mesh, trainer.rules)
  return trainer.evaluator(params)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  if flags.FLAGS.tasks:  # task evaluation (training/task_eval.py) instead of the split's
    metrics = evaluate_tasks(flags.FLAGS.workdir, flags.FLAGS.tasks,
                             batch_size=flags.FLAGS.task_batch_size,
                             max_new_tokens=flags.FLAGS.max_new_tokens,
                             limit=flags.FLAGS.task_limit)
  else:
    metrics = evaluate_run(flags.FLAGS.workdir, flags.FLAGS.eval_files,
                           flags.FLAGS.max_batches)
  for key in sorted(metrics):
    print(f"{key:32s} {metrics[key]:.6g}")
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(metrics, f, indent=2, sort_keys=True)


def define_flags():
  """Defined on use, not import: other entry points define flags of the same names."""
  flags.DEFINE_string("workdir", None, "The training run to evaluate.")
  flags.DEFINE_string("eval_files", "", "Evaluate on these files instead "
                                    "(sets config.data.source=files).")
  flags.DEFINE_integer("max_batches", 0, "Stop after this many batches (0: all).")
  flags.DEFINE_string("output", "", "Write the metrics here as JSON.")
  flags.DEFINE_list("tasks", [], "Task files (docs/formats.md, Evaluation tasks) or built-in "
                    "tasks (tiny_world_mc, tiny_world_qa) to score instead of the eval split; "
                    "results also go to {workdir}/task_eval.json.")
  flags.DEFINE_integer("task_batch_size", 32, "Sequences scored (or prompts generated) at once.")
  flags.DEFINE_integer("max_new_tokens", 64, "Generation tasks: reply length limit.")
  flags.DEFINE_integer("task_limit", 0, "Score only the first N items of each task (0: all).")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

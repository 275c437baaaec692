"""Evaluate a run's latest checkpoint on its held-out split (or on other files).

  python -m scripts.evaluate --workdir runs/pretrain_tiny
  python -m scripts.evaluate --workdir runs/pretrain_tiny --eval_files 'heldout/*.jsonl' \\
      --output runs/pretrain_tiny/eval_heldout.json

The run's own config (`config.json`) decides the stage, model and data; the whole eval split
is read once (or `--max_batches`), and the stage's own evaluation (e.g. generation accuracy)
runs too. Metrics are printed and, with `--output`, written as JSON.
"""

import json

from absl import app, flags, logging

from configs.cli import parse_flags



def evaluate_run(workdir: str, eval_files: str = "", max_batches: int = 0) -> dict[str, float]:
  """Held-out metrics of the latest checkpoint of the run in `workdir`."""
  import jax

  import models  # noqa: F401
  from configs.cli import load_run_config
  from data.pipeline import resolve_tokenizer
  from models.build import build_model_spec
  from parallel.mesh import make_mesh
  from parallel.rules import batch_sharding, get_rules, tree_shardings
  from training.checkpoint import Checkpointer
  from training.loop import EvalContext, evaluate, load_frozen_models
  from training.stages import get_stage
  from training.step import make_eval_step

  config = load_run_config(workdir)
  if eval_files:
    with config.unlocked():
      config.data.source, config.data.eval_files = "files", eval_files
  mesh, rules = make_mesh(config.mesh), get_rules(config.mesh.rules)
  tokenizer = resolve_tokenizer(config.data, workdir)
  stage = get_stage(config.objective.name)
  spec = build_model_spec(config.model, stage.model_kind)
  shardings = tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        spec.shapes, shardings)
  params = Checkpointer.restore_params(workdir, target)
  frozen_specs, frozen_params, frozen_shardings = load_frozen_models(stage, config, mesh, rules)
  eval_step = make_eval_step(spec, stage.loss_fn, config.objective, mesh=mesh, rules=rules,
                             params_shardings=shardings, frozen_specs=frozen_specs,
                             frozen_shardings=frozen_shardings)
  hosts, host = jax.process_count(), jax.process_index()
  make_iter = lambda: iter(stage.make_dataset(
      config, tokenizer, split="eval", batch_size=config.data.global_batch_size // hosts,
      shard_index=host, shard_count=hosts, seed=config.seed, num_epochs=1, workdir=workdir))
  steps = max_batches or 2 ** 31
  metrics = evaluate(eval_step, params, make_iter, steps, batch_sharding(mesh, rules),
                     config.data.global_batch_size, frozen_params)
  if stage.evaluate is not None:
    metrics.update(stage.evaluate(EvalContext(config, tokenizer, spec, params, mesh, rules,
                                              workdir)))
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  metrics = evaluate_run(flags.FLAGS.workdir, flags.FLAGS.eval_files, flags.FLAGS.max_batches)
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
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

"""The whole pipeline, stage after stage, each starting from the checkpoint of the one before.

  python -m scripts.pipeline --workdir runs/tiny                 # every stage, tiny presets
  python -m scripts.pipeline --workdir runs/tiny --stages pretrain,sft,dpo
  python -m scripts.pipeline --workdir runs/tiny --dry_run       # the equivalent commands

    pretrain -> cpt (new domain) -> sft -> reward model -> dpo (offline preferences)
             -> ppo, grpo, online dpo (online: sample, score, train again, from SFT)
             -> distill (teacher: pretrain) ;  mlm (the encoder, independent)
             -> classify (a task head on the pretrained decoder) ; classify_encoder (on mlm)

Each stage trains in `{workdir}/{stage}` through the same entry as `scripts.train`, so a
stopped pipeline resumes where it stopped (finished stages are skipped at no cost). At the end
a summary of every stage's held-out figures is printed and written to `{workdir}/summary.json`,
and `{workdir}/report.html` (training/reports.py) shows every stage's curves, before / after
figures and command, and the RL before / after table. Each stage starts with a "stage k of n"
line with the elapsed and the estimated remaining time.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys

from absl import app, flags, logging

from configs.cli import parse_flags
from training.checkpoint import CheckpointError
from training.metrics import quiet_library_logs, read_metrics
from training.outer_loop import ConfigChangeError, NonFiniteError
from training.eta import Countdown
from training.preemption import PREEMPTED_EXIT_CODE, Preempted
from training.reports import pipeline_report
from training.workdir_lock import WorkdirLockedError
from training.run import run_stage

# (stage, config module, preset, overrides; "{name}" is the workdir of an earlier stage).
PIPELINE = (
    ("pretrain", "pretrain", "tiny", {}),
    ("cpt", "cpt", "tiny", {"init_from": "{pretrain}"}),
    ("sft", "sft", "tiny", {"init_from": "{pretrain}"}),
    ("reward", "reward", "tiny", {"init_from": "{sft}"}),
    ("dpo", "dpo", "tiny", {"init_from": "{sft}"}),
    ("ppo", "ppo", "tiny", {"init_from": "{sft}"}),
    ("grpo", "grpo", "tiny", {"init_from": "{sft}"}),
    ("online_dpo", "online_dpo", "tiny", {"init_from": "{sft}"}),
    ("distill", "distill", "tiny", {"objective.teacher": "{pretrain}"}),
    ("mlm", "mlm", "tiny", {}),
    ("classify", "classify", "tiny", {"init_from": "{pretrain}"}),
    ("classify_encoder", "classify", "tiny_encoder", {"init_from": "{mlm}"}),
)
# The held-out figure each stage exists for (shown in the summary when logged).
HEADLINES = ("eval/loss", "eval_replay/loss", "eval/answer_accuracy", "eval/accuracy",
             "eval/pairs/accuracy", "eval/reward", "eval/sampled_reward", "eval/kl", "eval/nll",
             "eval/masked_accuracy", "eval_task/accuracy", "eval_task/macro_f1",
             "eval_task_init/accuracy")



def set_field(config, path: str, value) -> None:
  """config[path] = value for a dotted path; an unknown key is an error naming it."""
  *parents, leaf = path.split(".")
  node = config
  for key in parents:
    node = node[key]
  if leaf not in node:
    raise KeyError(f"unknown config key {path!r}")
  node[leaf] = value


def stage_plan(workdir: str, stages: list[str]) -> list[tuple[str, str, str, dict]]:
  """(stage, config module, preset, overrides with run paths filled in) for `stages`."""
  known = {s[0]: s for s in PIPELINE}
  unknown = [s for s in stages if s not in known]
  if unknown:
    raise app.UsageError(f"unknown stages {unknown}; choose from {list(known)}")
  dirs = {name: os.path.join(workdir, name) for name in known}
  plan = []
  for name in stages:
    _, module, preset, overrides = known[name]
    plan.append((name, module, preset, {k: v.format(**dirs) for k, v in overrides.items()}))
  return plan


def command(workdir: str, name: str, module: str, preset: str, overrides: dict) -> list[str]:
  argv = ["python", "-m", "scripts.train", f"--config=configs/{module}.py:{preset}",
          f"--workdir={os.path.join(workdir, name)}"]
  return argv + [f"--config.{k}={v}" for k, v in overrides.items()]


def headline(run_dir: str) -> dict[str, float]:
  """The stage's last logged value of each headline metric."""
  last: dict[str, float] = {}
  for record in read_metrics(run_dir):
    last.update({k: v for k, v in record.items() if k in HEADLINES or k.endswith("_init/loss")})
  return last


def run_pipeline(workdir: str, stages: list[str]) -> dict[str, dict[str, float]]:
  # A run of some stages keeps the other stages' figures of an earlier run of this workdir.
  summary_path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = {k: v for k, v in json.load(f).items() if k not in stages}
  countdown = Countdown(len(stages))
  for name, module, preset, overrides in stage_plan(workdir, stages):
    print(f"=== {countdown.line(stages.index(name) + 1, 'stage', name)}", flush=True)
    config = importlib.import_module(f"configs.{module}").get_config(preset)
    for path, value in overrides.items():
      set_field(config, path, value)
    logging.info("=== stage %s: %s", name, shlex.join(command(workdir, name, module, preset,
                                                                 overrides)))
    run_stage(config, os.path.join(workdir, name))
    summary[name] = headline(os.path.join(workdir, name))
    with open(summary_path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  # Every stage with figures in this workdir, in pipeline order.
  summary = {name: summary[name] for name, *_ in PIPELINE if name in summary}
  write_report(workdir, summary)
  return summary


def write_report(workdir: str, summary: dict[str, dict[str, float]]) -> str:
  """`{workdir}/report.html` (and report.md): every stage run in this workdir, with its
  curves, before / after figures and command (training/reports.py); returns the HTML path."""
  ran = [name for name, *_ in PIPELINE if os.path.isdir(os.path.join(workdir, name))]
  commands = [(name, shlex.join(command(workdir, name, module, preset, overrides)))
              for name, module, preset, overrides in stage_plan(workdir, ran)]
  return pipeline_report(workdir, commands, summary)[1]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  plan = stage_plan(flags.FLAGS.workdir, flags.FLAGS.stages)
  if flags.FLAGS.dry_run:
    for name, module, preset, overrides in plan:
      print(shlex.join(command(flags.FLAGS.workdir, name, module, preset, overrides)))
    return
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  try:
    summary = run_pipeline(flags.FLAGS.workdir, flags.FLAGS.stages)
  except Preempted as e:  # rerunning the same command resumes the stage and goes on
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  except (NonFiniteError, WorkdirLockedError, ConfigChangeError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  for name, figures in summary.items():
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(figures.items()))
    print(f"{name:10s} {shown}")
  sys.stdout.flush()


def define_flags():
  """Defined on use, not import: other entry points define flags of the same names."""
  flags.DEFINE_string("workdir", None, "Parent directory: one run per stage.")
  flags.DEFINE_list("stages", [s[0] for s in PIPELINE], "Stages to run, in order.")
  flags.DEFINE_bool("dry_run", False, "Print the scripts.train commands only.")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

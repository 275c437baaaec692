"""Reproduce a paper's figure on the tiny world, one command each:

  python -m scripts.reproduce chinchilla --workdir runs/chinchilla [--quick]
  python -m scripts.reproduce dpo_frontier --workdir runs/dpo_frontier [--quick]
  python -m scripts.reproduce overoptimization --workdir runs/overopt [--quick] \\
      [--base_runs runs/dpo_frontier/base]

Each reproduction (configs/papers/{name}.py: the paper, figure and claim) trains its runs
through the same stage entry as scripts.train (`{workdir}/runs/...`; rerunning resumes and
skips finished runs), fits what the paper fits, and writes `{workdir}/report.html` with the
figure, the fitted numbers and a comparison with the paper's claim. `--quick` runs a smaller
grid (under 10 minutes on 2 CPU cores); `--analyse_only` redoes the fit and report from the
finished runs. The RLHF reproductions (dpo_frontier, overoptimization) start from a
pretrain -> SFT -> reward-model chain they train in `{workdir}/base`, or reuse from
`--base_runs DIR` (a folder holding pretrain/, sft/ and reward/ runs, e.g. another
reproduction's base or a scripts.pipeline workdir).
"""

import importlib

from absl import app, flags, logging

from configs.cli import parse_flags
from training import chinchilla, frontier, overoptimization
from training.metrics import quiet_library_logs

# name -> (config module, train(config, workdir), analyse(config, workdir) -> (fit, html)).
REPRODUCTIONS = {
    "chinchilla": ("configs.papers.chinchilla", chinchilla.train_runs, chinchilla.analyse),
    "dpo_frontier": ("configs.papers.dpo_frontier", frontier.train_runs, frontier.analyse),
    "overoptimization": ("configs.papers.overoptimization", overoptimization.train_runs,
                         overoptimization.analyse),
}


def reproduce(name: str, workdir: str, preset: str, analyse_only: bool = False,
              base_runs: str = ""):
  """Trains (unless `analyse_only`) and analyses reproduction `name`; returns (fit, html).
  `base_runs`: the folder of finished base runs to reuse (RLHF reproductions only)."""
  if name not in REPRODUCTIONS:
    raise app.UsageError(f"unknown reproduction {name!r}; choose one of {list(REPRODUCTIONS)}")
  module, train, analyse = REPRODUCTIONS[name]
  config = importlib.import_module(module).get_config(preset)
  if base_runs:
    if "base_runs" not in config:
      raise app.UsageError(f"--base_runs: reproduction {name!r} starts from no base runs")
    config.base_runs = base_runs
  if not analyse_only:
    train(config, workdir)
  return analyse(config, workdir)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("give one reproduction name, e.g. chinchilla")
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  preset = flags.FLAGS.preset or ("quick" if flags.FLAGS.quick else "full")
  fit, page = reproduce(argv[1], flags.FLAGS.workdir, preset, flags.FLAGS.analyse_only,
                        flags.FLAGS.base_runs)
  print(f"fit: {fit}")
  print(f"report: {page}")


def define_flags():
  """Defined on use, not import: other entry points define flags of the same names."""
  flags.DEFINE_string("workdir", None, "Directory of the reproduction's runs and report.")
  flags.DEFINE_bool("quick", False, "The small grid (minutes on a CPU).")
  flags.DEFINE_string("preset", "", "A preset of the reproduction's config (overrides "
                      "--quick), e.g. 'test'.")
  flags.DEFINE_bool("analyse_only", False, "Fit and report the finished runs; train nothing.")
  flags.DEFINE_string("base_runs", "", "RLHF reproductions: a folder of finished pretrain/, "
                      "sft/ and reward/ runs to start from ('' = train them in "
                      "{workdir}/base).")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

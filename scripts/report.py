"""Plots and a report of one or more runs, from their metrics.jsonl.

  python -m scripts.report runs/tiny/pretrain --out reports/pretrain
  python -m scripts.report runs/lr_sweep/lr=0.001 runs/lr_sweep/lr=0.003 --out reports/lr

Draws every run's curves (train and held-out loss, the stage's headline metrics, learning
rate, gradient norm, tokens/s; several runs overlaid on one figure per panel) as PNGs in
`--out`, with `report.md` beside them and a self-contained `report.html` (the PNGs embedded),
plus a table of every metric's last value and each run's before / after held-out figures.
The pipeline (`{workdir}/report.html`) and sweeps write their own reports the same way
(training/reports.py).
"""

from absl import app, flags

from configs.cli import parse_flags
from training.reports import run_report


def main(argv):
  run_dirs = argv[1:]
  if not run_dirs:
    raise app.UsageError("give one or more run directories")
  markdown, page = run_report(run_dirs, flags.FLAGS.out)
  print(f"wrote {markdown} and {page}")


def define_flags():
  """Defined on use, not import: other entry points define flags of the same names."""
  flags.DEFINE_string("out", None, "Directory for the PNGs, report.md and report.html.")
  flags.mark_flag_as_required("out")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)

"""Train any stage from its config.

  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny
  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/x \\
      --config.optimizer.lr=1e-3 --config.train.steps=200

Rerunning the same command on the same workdir resumes from its latest checkpoint. Every config
field can be overridden with --config.<section>.<field>=value; an unknown field is an error.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from configs.cli import parse_flags
from training.metrics import quiet_library_logs
from training.run import run_stage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  final = run_stage(_CONFIG.value, _WORKDIR.value)
  logging.info("final: %s", {k: round(v, 4) for k, v in final.items()})


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""Train any stage from its config.

  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/pretrain_tiny
  python -m scripts.train --config configs/pretrain.py:tiny --workdir runs/x \\
      --config.optimizer.lr=1e-3 --config.train.steps=200

Rerunning the same command on the same workdir resumes from its latest checkpoint. Every config
field can be overridden with --config.<section>.<field>=value; an unknown field is an error.

Exit status: 0 when the run finished; 75 (training/preemption.py PREEMPTED_EXIT_CODE) after
SIGTERM / SIGINT stopped it with a checkpoint of its last step (rerun to resume); 1 with one
`error: ...` line when it failed (e.g. a non-finite loss, config.train.nonfinite).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs.cli import parse_flags
from training.validate import ConfigError, check_config
from parallel.distributed import maybe_initialize_distributed
from parallel.xla_settings import apply_xla_settings
from training.checkpoint import CheckpointError
from training.metrics import quiet_library_logs
from training.outer_loop import ConfigChangeError, NonFiniteError
from training.preemption import PREEMPTED_EXIT_CODE, Preempted
from training.workdir_lock import WorkdirLockedError
from training.run import run_stage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The platform's XLA flags (GPU: latency-hiding scheduler, pipelined collectives) before the
  # backend starts; nothing on CPU or TPU.
  apply_xla_settings()
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  # The validator counts devices, so a multi-host job joins jax.distributed before it.
  maybe_initialize_distributed()
  try:
    check_config(_CONFIG.value)
  except ConfigError as e:  # every unworkable value at once, before anything is built
    sys.exit(f"error: {e}")
  try:
    final = run_stage(_CONFIG.value, _WORKDIR.value)
  except Preempted as e:  # a checkpoint of the stopping step is committed
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  except (NonFiniteError, WorkdirLockedError, ConfigChangeError, CheckpointError) as e:
    sys.exit(f"error: {e}")  # the last line of a failed run is its reason
  logging.info("final: %s", {k: round(v, 4) for k, v in final.items()})


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""Runs one command on every worker of an existing Cloud TPU VM (a single host or a pod slice).

  python -m scripts.launch_tpu --tpu my-v5e-256 --zone us-west4-a -- \\
      python -m scripts.train --config configs/pretrain.py:llama3_8b \\
      --workdir gs://my-bucket/runs/llama3_8b
  python -m scripts.launch_tpu --tpu my-v5e-256 --zone us-west4-a --dry-run -- python -m ...

Creates nothing: the TPU VM must exist (`gcloud compute tpus tpu-vm create`). In order:
  1. packs this checkout (its files, without .git, runs/ and caches) into a tarball,
  2. copies it to every worker (`gcloud compute tpus tpu-vm scp --worker=all`),
  3. unpacks it into --remote_dir and installs it with the TPU extra (`pip install -e .[tpu]`),
  4. runs the same command on every worker (`gcloud compute tpus tpu-vm ssh --worker=all`).
Each worker's `scripts.train` detects the TPU pod and calls `jax.distributed.initialize()`
itself (parallel/distributed.py). `--skip_setup` reruns only step 4; `--dry-run` prints the
exact commands of every step and runs none. Checkpoints and metrics of a pod run belong on a
shared path (gs://...), since each worker has its own disk.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app, flags

_TPU = flags.DEFINE_string("tpu", None, "Name of the TPU VM (`gcloud compute tpus tpu-vm list`).")
_ZONE = flags.DEFINE_string("zone", None, "Zone of the TPU VM, e.g. us-west4-a.")
_PROJECT = flags.DEFINE_string("project", "", "Google Cloud project (default: gcloud's).")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "lmpipe", "Checkout directory on each worker, "
                                  "relative to the home directory.")
_ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE set for the command on every worker.")
_SKIP_SETUP = flags.DEFINE_bool("skip_setup", False, "Do not copy or install; only run.")
_DETACH = flags.DEFINE_bool("detach", False, "Start the command in the background on every "
                            "worker (log in <remote_dir>/launch.log) and return.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the commands instead of running them.")
flags.mark_flags_as_required(["tpu", "zone"])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = "/tmp/lmpipe-launch.tar.gz"
_EXCLUDES = (".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache")


def gcloud_tpu(verb: str, tpu: str, zone: str, project: str, *args: str) -> list[str]:
  """`gcloud compute tpus tpu-vm <verb>` addressed to every worker of `tpu`."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb]
  if verb == "ssh":
    command.append(tpu)
  command += list(args) + ["--worker=all", f"--zone={zone}"]
  if project:
    command.append(f"--project={project}")
  return command


def launch_commands(command: Sequence[str], *, tpu: str, zone: str, project: str = "",
                    remote_dir: str = "lmpipe", env: Sequence[str] = (), setup: bool = True,
                    detach: bool = False, root: str = ROOT) -> list[list[str]]:
  """The commands (argument lists) that set up the workers and run `command` on all of them.

  Raises:
    ValueError: no command, or an --env entry without '='.
  """
  if not command:
    raise ValueError("no command to run: put it after --, e.g. -- python -m scripts.train ...")
  for entry in env:
    if "=" not in entry:
      raise ValueError(f"--env {entry!r} is not KEY=VALUE")
  steps = []
  remote = shlex.quote(remote_dir)
  if setup:
    steps.append(["tar", "-czf", TARBALL, "-C", root]
                 + [f"--exclude={pattern}" for pattern in _EXCLUDES] + ["."])
    steps.append(gcloud_tpu("scp", tpu, zone, project, TARBALL, f"{tpu}:{TARBALL}"))
    install = (f"mkdir -p {remote} && tar -xzf {TARBALL} -C {remote} && cd {remote} && "
               'python3 -m pip install --quiet -e ".[tpu]"')
    steps.append(gcloud_tpu("ssh", tpu, zone, project, f"--command={install}"))
  run = " ".join([shlex.quote(e) for e in env] + [shlex.quote(c) for c in command])
  if detach:
    run = f"nohup env {run} > launch.log 2>&1 < /dev/null &"
  steps.append(gcloud_tpu("ssh", tpu, zone, project, f"--command=cd {remote} && {run}"))
  return steps


def main(argv):
  command = argv[1:]
  if command and command[0] == "--":
    command = command[1:]
  try:
    steps = launch_commands(command, tpu=_TPU.value, zone=_ZONE.value, project=_PROJECT.value,
                            remote_dir=_REMOTE_DIR.value, env=_ENV.value,
                            setup=not _SKIP_SETUP.value, detach=_DETACH.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  for step in steps:
    print(shlex.join(step), flush=True)
    if not _DRY_RUN.value:
      subprocess.run(step, check=True)


if __name__ == "__main__":
  app.run(main)

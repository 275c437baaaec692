"""Runs one command on every worker of an existing Cloud TPU VM (a single host or a pod slice),
detached from this terminal, and follows, shows or stops it later.

  python -m scripts.launch_tpu --tpu my-v5e-256 --zone us-west4-a -- \\
      python -m scripts.train --config configs/pretrain.py:llama3_8b \\
      --workdir gs://my-bucket/runs/llama3_8b
  python -m scripts.launch_tpu --tpu my-v5e-256 --zone us-west4-a --attach   # follow the logs
  python -m scripts.launch_tpu --tpu my-v5e-256 --zone us-west4-a --logs     # the last lines
  python -m scripts.launch_tpu --tpu my-v5e-256 --zone us-west4-a --stop     # SIGTERM the run

Creates nothing: the TPU VM must exist (`gcloud compute tpus tpu-vm create`). A launch, in order:
  1. packs the project's own files into a tarball: what `git ls-files` lists (tracked, plus
     new files git does not ignore); outside a git checkout, every file but virtual
     environments, runs/ and caches (`EXCLUDED`). The list is written next to the tarball,
  2. copies it to every worker (`gcloud compute tpus tpu-vm scp --worker=all`),
  3. unpacks it into --remote_dir and installs it with the TPU extra (`pip install -e .[tpu]`),
  4. starts the command on every worker in a session of its own (`setsid nohup`), so a dropped
     ssh connection does not end it, with its output in <remote_dir>/launch-<host>.log and
     its pid in <remote_dir>/launch-<host>.pid; a worker whose previous run is alive refuses.
Each worker's `scripts.train` detects the TPU pod and calls `jax.distributed.initialize()`
itself (parallel/distributed.py). `--skip_setup` reruns only step 4; `--attach` after a
command follows the logs once it started (Ctrl-C leaves the run going). `--stop` sends SIGTERM
to each worker's run (its whole process group): scripts.train checkpoints the step it is at and
exits. `--dry-run` prints the exact commands and runs none (it still writes the file list, to
read what would be shipped). Checkpoints and metrics of a pod run belong on a shared path
(gs://...), since each worker has its own disk.
"""

from __future__ import annotations

import fnmatch
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
_ATTACH = flags.DEFINE_bool("attach", False, "Follow the run's logs (after starting it, when "
                            "a command is given); Ctrl-C stops following, not the run.")
_LOGS = flags.DEFINE_bool("logs", False, "Print the last --lines of the run's logs and return.")
_STOP = flags.DEFINE_bool("stop", False, "Send SIGTERM to the run (it checkpoints and exits).")
_LINES = flags.DEFINE_integer("lines", 100, "Log lines shown by --logs and --attach.")
_WORKER = flags.DEFINE_string("worker", "all", "Workers --attach / --logs / --stop address: "
                              "all, or e.g. 0 (the one that prints the progress lines).")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the commands instead of running them.")
flags.mark_flags_as_required(["tpu", "zone"])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = "/tmp/lmpipe-launch.tar.gz"
FILE_LIST = "/tmp/lmpipe-launch.files"
# Outside a git checkout: never shipped (names of files or folders, at any depth). A folder
# holding a pyvenv.cfg is a virtual environment whatever its name.
EXCLUDED = (".git", ".venv", "venv", ".env", "env", "runs", "workdir*", "__pycache__", "*.pyc",
            "*.egg-info", "build", "dist", ".pytest_cache", ".mypy_cache", ".ruff_cache",
            ".cache", ".tox", ".nox", ".ipynb_checkpoints", "node_modules", "wandb")
# The worker's own names, so a home directory shared by the workers keeps one file each.
LOG = "launch-$(hostname).log"
PID = "launch-$(hostname).pid"


def gcloud_tpu(verb: str, tpu: str, zone: str, project: str, *args: str,
               worker: str = "all") -> list[str]:
  """`gcloud compute tpus tpu-vm <verb>` addressed to `worker` (all, or one index) of `tpu`."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb]
  if verb == "ssh":
    command.append(tpu)
  command += list(args) + [f"--worker={worker}", f"--zone={zone}"]
  if project:
    command.append(f"--project={project}")
  return command


def shipped_files(root: str = ROOT) -> list[str]:
  """The project's own files under `root`, relative and sorted: `git ls-files` (tracked and
  new unignored files that exist) in a git checkout, else a walk skipping `EXCLUDED`."""
  try:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "-z"], cwd=root, capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    listed = None
  if listed is not None:
    # A tracked file deleted from the work tree is still listed; tar would fail on it.
    return sorted({f for f in listed.decode().split("\0")
                   if f and os.path.isfile(os.path.join(root, f))})
  excluded = lambda name: any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED)
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if not excluded(d)
               and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))]
    files += [os.path.relpath(os.path.join(folder, n), root) for n in names if not excluded(n)]
  return sorted(files)


def _check_env(env: Sequence[str]) -> None:
  for entry in env:
    if "=" not in entry:
      raise ValueError(f"--env {entry!r} is not KEY=VALUE")


def run_command(command: Sequence[str], env: Sequence[str] = ()) -> str:
  """The shell line each worker runs: `command` detached, logging to its own file, unless the
  worker's previous run is still alive."""
  line = " ".join([shlex.quote(e) for e in env] + [shlex.quote(c) for c in command])
  return (f'if [ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null; then '
          f'echo "$(hostname): a run is going on, pid $(cat {PID}) (--stop ends it)" >&2; '
          f"exit 1; fi; setsid nohup env {line} > {LOG} 2>&1 < /dev/null & echo $! > {PID}")


def launch_commands(command: Sequence[str], *, tpu: str, zone: str, project: str = "",
                    remote_dir: str = "lmpipe", env: Sequence[str] = (), setup: bool = True,
                    root: str = ROOT) -> list[list[str]]:
  """The commands (argument lists) that set up the workers and start `command` on all of them;
  setup packs the files listed in `FILE_LIST` (write `shipped_files()` there first).

  Raises:
    ValueError: no command, or an --env entry without '='.
  """
  if not command:
    raise ValueError("no command to run: put it after --, e.g. -- python -m scripts.train ...")
  _check_env(env)
  steps = []
  remote = shlex.quote(remote_dir)
  if setup:
    steps.append(["tar", "-czf", TARBALL, "-C", root, f"--files-from={FILE_LIST}"])
    steps.append(gcloud_tpu("scp", tpu, zone, project, TARBALL, f"{tpu}:{TARBALL}"))
    install = (f"mkdir -p {remote} && tar -xzf {TARBALL} -C {remote} && cd {remote} && "
               'python3 -m pip install --quiet -e ".[tpu]"')
    steps.append(gcloud_tpu("ssh", tpu, zone, project, f"--command={install}"))
  steps.append(gcloud_tpu("ssh", tpu, zone, project,
                          f"--command=cd {remote} && {run_command(command, env)}"))
  return steps


def control_command(action: str, *, tpu: str, zone: str, project: str = "",
                    remote_dir: str = "lmpipe", worker: str = "all", lines: int = 100
                    ) -> list[str]:
  """The command that follows ('attach'), prints ('logs') or stops ('stop') a started run;
  every log line starts with its worker's host name."""
  remote = shlex.quote(remote_dir)
  prefix = 'sed -u "s/^/$(hostname): /"'
  remote_line = {
      "attach": f"tail -n {lines} -F {LOG} | {prefix}",
      "logs": f"tail -n {lines} {LOG} | {prefix}",
      # The negative pid addresses the process group setsid made: the command and its children.
      "stop": (f'kill -TERM -- -"$(cat {PID})" && '
               f'echo "$(hostname): sent SIGTERM to run $(cat {PID})"'),
  }[action]
  return gcloud_tpu("ssh", tpu, zone, project, f"--command=cd {remote} && {remote_line}",
                    worker=worker)


def main(argv):
  command = argv[1:]
  if command and command[0] == "--":
    command = command[1:]
  where = dict(tpu=_TPU.value, zone=_ZONE.value, project=_PROJECT.value,
               remote_dir=_REMOTE_DIR.value)
  attach = control_command("attach", **where, worker=_WORKER.value, lines=_LINES.value)
  try:
    if _LOGS.value or _STOP.value:
      if command or _ATTACH.value or (_LOGS.value and _STOP.value):
        raise ValueError("--logs and --stop take no command and go alone")
      steps = [control_command("logs" if _LOGS.value else "stop", **where,
                               worker=_WORKER.value, lines=_LINES.value)]
    elif _ATTACH.value and not command:
      steps = [attach]
    else:
      steps = launch_commands(command, env=_ENV.value, setup=not _SKIP_SETUP.value, **where)
      steps += [attach] if _ATTACH.value else []
  except ValueError as e:
    sys.exit(f"error: {e}")
  if any(step[0] == "tar" for step in steps):
    with open(FILE_LIST, "w", encoding="utf-8") as f:
      # "./" keeps a name that starts with "-" from reading as a tar option.
      f.writelines(f"./{name}\n" for name in shipped_files())
  for step in steps:
    print(shlex.join(step), flush=True)
    if not _DRY_RUN.value:
      try:
        subprocess.run(step, check=True)
      except KeyboardInterrupt:
        if step is not attach:
          raise
        return  # Ctrl-C while following the logs: the run goes on

if __name__ == "__main__":
  app.run(main)

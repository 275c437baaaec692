"""Launch scripts: the exact commands `--dry-run` prints for a TPU pod and for SLURM, and the
TPU workers' shell lines run here."""

import os
import shlex
import socket
import subprocess
import sys
import time

import pytest

from scripts.launch_tpu import (FILE_LIST, ROOT, control_command, launch_commands, run_command,
                                shipped_files)

TRAIN = ["python3", "-m", "scripts.train", "--config", "configs/pretrain.py:llama3_8b",
         "--workdir", "gs://bucket/runs/llama3 8b"]


def _run(args, env=None):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})), check=False)


def _remote(line):
  return shlex.quote(f"--command=cd lmpipe && {line}")


def test_dry_run_prints_the_exact_commands():
  result = _run([sys.executable, "-m", "scripts.launch_tpu", "--tpu", "pod-256", "--zone",
                 "us-west4-a", "--project", "my-proj", "--dry-run", "--"] + TRAIN)
  assert result.returncode == 0, result.stderr
  where = "--worker=all --zone=us-west4-a --project=my-proj"
  train = ("python3 -m scripts.train --config configs/pretrain.py:llama3_8b --workdir "
           "'gs://bucket/runs/llama3 8b'")
  assert result.stdout.splitlines() == [
      f"tar -czf /tmp/lmpipe-launch.tar.gz -C {ROOT} --files-from=/tmp/lmpipe-launch.files",
      "gcloud compute tpus tpu-vm scp /tmp/lmpipe-launch.tar.gz "
      f"pod-256:/tmp/lmpipe-launch.tar.gz {where}",
      "gcloud compute tpus tpu-vm ssh pod-256 '--command=mkdir -p lmpipe && tar -xzf "
      "/tmp/lmpipe-launch.tar.gz -C lmpipe && cd lmpipe && python3 -m pip install --quiet -e "
      f"\".[tpu]\"' {where}",
      "gcloud compute tpus tpu-vm ssh pod-256 " + _remote(
          'if [ -f launch-$(hostname).pid ] && kill -0 "$(cat launch-$(hostname).pid)" '
          '2>/dev/null; then echo "$(hostname): a run is going on, pid $(cat '
          'launch-$(hostname).pid) (--stop ends it)" >&2; exit 1; fi; setsid nohup env '
          f"{train} > launch-$(hostname).log 2>&1 < /dev/null & echo $! > "
          "launch-$(hostname).pid") + f" {where}",
  ]
  with open(FILE_LIST) as f:  # what the tarball holds: the project's files, as ./relative
    shipped = f.read().splitlines()
  assert "./scripts/launch_tpu.py" in shipped and "./README.md" in shipped
  assert not [f for f in shipped if f.startswith(("./.git/", "./runs/", "./.venv/"))
              or "__pycache__" in f]


def test_follow_show_and_stop_a_started_run():
  base = [sys.executable, "-m", "scripts.launch_tpu", "--tpu", "v5p", "--zone", "us-east5-a",
          "--dry-run"]
  where = "--worker=all --zone=us-east5-a"
  logs = _run(base + ["--logs", "--lines=20"])
  assert logs.stdout == ("gcloud compute tpus tpu-vm ssh v5p " + _remote(
      'tail -n 20 launch-$(hostname).log | sed -u "s/^/$(hostname): /"') + f" {where}\n")
  attach = _run(base + ["--attach", "--worker=0"])
  assert attach.stdout == ("gcloud compute tpus tpu-vm ssh v5p " + _remote(
      'tail -n 100 -F launch-$(hostname).log | sed -u "s/^/$(hostname): /"')
      + " --worker=0 --zone=us-east5-a\n")
  stop = _run(base + ["--stop"])
  assert stop.stdout == ("gcloud compute tpus tpu-vm ssh v5p " + _remote(
      'kill -TERM -- -"$(cat launch-$(hostname).pid)" && echo "$(hostname): sent SIGTERM to '
      'run $(cat launch-$(hostname).pid)"') + f" {where}\n")
  started = _run(base + ["--skip_setup", "--attach", "--", "true"])
  assert started.stdout.splitlines()[1] == attach.stdout.strip().replace("--worker=0",
                                                                         "--worker=all")
  refused = _run(base + ["--stop", "--", "true"])
  assert refused.returncode == 1 and "--logs and --stop take no command" in refused.stderr


def test_the_worker_side_lines_detach_refuse_a_second_run_and_stop_it(tmp_path):
  # The exact shell lines the workers run, run here: the run outlives its shell, logs to its
  # file, a second start is refused while it lives, and the stop line ends its process group.
  remote = lambda line: subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True,
                                       text=True, timeout=30, check=False)
  started = remote(run_command(["sh", "-c", "echo started; sleep 60 & wait"], ["X=1"]))
  assert started.returncode == 0, started.stderr
  host = socket.gethostname()
  pid = int((tmp_path / f"launch-{host}.pid").read_text())
  for _ in range(100):
    if (tmp_path / f"launch-{host}.log").read_text() == "started\n":
      break
    time.sleep(0.05)
  assert (tmp_path / f"launch-{host}.log").read_text() == "started\n"
  assert os.getpgid(pid) == pid  # its own session and process group
  again = remote(run_command(["true"]))
  assert again.returncode == 1
  assert again.stderr == f"{host}: a run is going on, pid {pid} (--stop ends it)\n"
  stop = control_command("stop", tpu="t", zone="z")[6].removeprefix("--command=cd lmpipe && ")
  assert remote(stop).stdout == f"{host}: sent SIGTERM to run {pid}\n"
  for _ in range(100):
    if remote(f"kill -0 -- -{pid}").returncode != 0:
      break
    time.sleep(0.05)
  assert remote(f"kill -0 -- -{pid}").returncode != 0  # the whole group is gone


def test_shipped_files_are_gits_or_all_but_environments_and_runs(tmp_path):
  for name in ("train.py", "pkg/mod.py", "runs/r/metrics.jsonl", "myenv/pyvenv.cfg",
               "myenv/lib/x.py", ".venv/bin/python", "pkg/__pycache__/mod.pyc",
               "x.egg-info/PKG-INFO", ".cache/f"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("")
  assert shipped_files(str(tmp_path)) == ["pkg/mod.py", "train.py"]  # not a git checkout
  git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True,
                                     capture_output=True)
  git("init", "-q")
  (tmp_path / ".gitignore").write_text("runs/\n.venv/\nmyenv/\n__pycache__/\n*.egg-info/\n"
                                       ".cache/\n")
  git("add", "train.py", ".gitignore")
  (tmp_path / "committed_then_deleted.py").write_text("")
  git("add", "committed_then_deleted.py")
  (tmp_path / "committed_then_deleted.py").unlink()
  # Tracked files and new unignored ones; a deleted tracked file is not there to ship.
  assert shipped_files(str(tmp_path)) == [".gitignore", "pkg/mod.py", "train.py"]


def test_launch_errors():
  with pytest.raises(ValueError, match="no command to run"):
    launch_commands([], tpu="t", zone="z")
  with pytest.raises(ValueError, match="--env 'FOO' is not KEY=VALUE"):
    launch_commands(["true"], tpu="t", zone="z", env=["FOO"])
  result = _run([sys.executable, "-m", "scripts.launch_tpu", "--tpu", "t", "--zone", "z",
                 "--dry-run"])
  assert result.returncode == 1 and "error: no command to run" in result.stderr


SBATCH = os.path.join(ROOT, "scripts", "slurm_train.sbatch")


def test_slurm_script_dry_run():
  assert _run(["bash", "-n", SBATCH]).returncode == 0
  result = _run(["bash", SBATCH, "--config", "configs/pretrain.py:1b", "--workdir",
                 "/shared/runs/my run"], env=dict(DRY_RUN="1", SLURM_SUBMIT_DIR=ROOT))
  assert result.returncode == 0, result.stderr
  assert result.stdout == ("srun --kill-on-bad-exit=1 --cpu-bind=none python -m scripts.train "
                           "--config configs/pretrain.py:1b --workdir /shared/runs/my\\ run\n")
  with open(SBATCH) as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  assert directives[:4] == ["--job-name=lmpipe", "--nodes=2", "--ntasks-per-node=8",
                            "--gpus-per-node=8"]

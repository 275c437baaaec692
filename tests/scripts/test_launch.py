"""Launch scripts: the exact commands `--dry-run` prints for a TPU pod and for SLURM."""

import os
import subprocess
import sys

import pytest

from scripts.launch_tpu import ROOT, launch_commands

TRAIN = ["python3", "-m", "scripts.train", "--config", "configs/pretrain.py:llama3_8b",
         "--workdir", "gs://bucket/runs/llama3 8b"]


def _run(args, env=None):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})), check=False)


def test_dry_run_prints_the_exact_commands():
  result = _run([sys.executable, "-m", "scripts.launch_tpu", "--tpu", "pod-256", "--zone",
                 "us-west4-a", "--project", "my-proj", "--dry-run", "--"] + TRAIN)
  assert result.returncode == 0, result.stderr
  where = "--worker=all --zone=us-west4-a --project=my-proj"
  assert result.stdout.splitlines() == [
      f"tar -czf /tmp/lmpipe-launch.tar.gz -C {ROOT} --exclude=.git --exclude=runs "
      "--exclude=__pycache__ '--exclude=*.egg-info' --exclude=.pytest_cache .",
      "gcloud compute tpus tpu-vm scp /tmp/lmpipe-launch.tar.gz "
      f"pod-256:/tmp/lmpipe-launch.tar.gz {where}",
      "gcloud compute tpus tpu-vm ssh pod-256 '--command=mkdir -p lmpipe && tar -xzf "
      "/tmp/lmpipe-launch.tar.gz -C lmpipe && cd lmpipe && python3 -m pip install --quiet -e "
      f"\".[tpu]\"' {where}",
      "gcloud compute tpus tpu-vm ssh pod-256 '--command=cd lmpipe && python3 -m scripts.train "
      "--config configs/pretrain.py:llama3_8b --workdir '\"'\"'gs://bucket/runs/llama3 8b'\"'\"''"
      f" {where}",
  ]


def test_run_only_detached_with_environment():
  steps = launch_commands(["python3", "-m", "scripts.train", "--workdir", "gs://b/r"],
                          tpu="v5p", zone="us-east5-a", env=["LIBTPU_INIT_ARGS=--x=1"],
                          setup=False, detach=True, remote_dir="code")
  assert steps == [[
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5p",
      "--command=cd code && nohup env LIBTPU_INIT_ARGS=--x=1 python3 -m scripts.train "
      "--workdir gs://b/r > launch.log 2>&1 < /dev/null &",
      "--worker=all", "--zone=us-east5-a"]]


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

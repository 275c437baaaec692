"""Preemption: SIGTERM to a real training process (and to one of two processes of a multi-host
run) stops it after the current step with a committed checkpoint of that step, exit status 75,
and the rerun resumes from there."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data.pipeline import resolve_tokenizer
from training.checkpoint import Checkpointer
from training.loop import train_and_evaluate
from training.metrics import read_metrics
from training.preemption import PREEMPTED_EXIT_CODE
from tests.training.test_multiprocess import ROOT, _free_port, peer_cache_env, small_config

LONG = 100_000  # steps: the run only ends by the signal

WORKER = """
import json, sys
from absl import logging
from tests.training.test_multiprocess import small_config
from training.loop import train_and_evaluate
from training.preemption import PREEMPTED_EXIT_CODE, Preempted
args = json.loads(sys.argv[1])
logging.set_verbosity(logging.INFO)
config = small_config(args["tokenizer"], args["mesh"])
config.train.steps = args["steps"]
config.checkpoint.every_steps = 0
try:
  train_and_evaluate(config, args["workdir"])
except Preempted as e:
  print(f"PREEMPTED {e.step}", flush=True)
  sys.exit(PREEMPTED_EXIT_CODE)
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  resolve_tokenizer(small_config("", (1, 1, 1)).data, directory)
  return os.path.join(directory, "tokenizer", "spm.model")


def _wait_for_step(workdir: str, step: int, procs, timeout: float = 300) -> None:
  """Waits until process 0 has logged `step` (metrics.jsonl), failing if a process died."""
  deadline = time.monotonic() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), "a training process ended early"
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(line)["step"] >= step for line in f if line.strip()):
          return
    time.sleep(0.2)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def _latest_step(workdir: str) -> int | None:
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  ckpt.close()
  return step


def _spawn(tokenizer, mesh, workdir, env_extra, log):
  args = json.dumps(dict(tokenizer=tokenizer, mesh=mesh, workdir=workdir, steps=LONG))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env_extra)
  with open(log, "w") as out:
    return subprocess.Popen([sys.executable, "-c", WORKER, args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_rerun_resumes(tokenizer,
                                                                             tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  log = str(tmp_path / "run.log")
  proc = _spawn(tokenizer, (2, 2, 2), workdir,
                {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, log)
  try:
    _wait_for_step(workdir, 3, [proc])
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = open(log).read()
  assert proc.returncode == PREEMPTED_EXIT_CODE, text[-3000:]
  stopped = int(text.split("PREEMPTED ")[1].split()[0])
  assert "SIGTERM received: stopping after the current step" in text
  # The checkpoint of the very step it stopped at, although every_steps is 0 (forced only).
  assert _latest_step(workdir) == stopped >= 3
  assert read_metrics(workdir)[-1]["step"] == stopped  # its window was logged too
  # The same run resumes from that step.
  config = small_config(tokenizer, (2, 2, 2))
  config.train.steps = stopped + 2
  train_and_evaluate(config, workdir)
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == list(range(1, stopped + 3))
  assert _latest_step(workdir) == stopped + 2


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tokenizer, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  port = _free_port()
  procs, logs = [], []
  for process_id in range(2):
    logs.append(str(tmp_path / f"process_{process_id}.log"))
    procs.append(_spawn(tokenizer, (2, 2, 2), workdir, dict(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(process_id),
        XLA_FLAGS="--xla_force_host_platform_device_count=4", **peer_cache_env(process_id)),
        logs[-1]))
  try:
    _wait_for_step(workdir, 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # only one host gets the notice
    for proc in procs:
      proc.wait(timeout=180)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  texts = [open(log).read() for log in logs]
  for proc, text in zip(procs, texts):
    assert proc.returncode == PREEMPTED_EXIT_CODE, text[-3000:]
  stopped = [int(text.split("PREEMPTED ")[1].split()[0]) for text in texts]
  assert stopped[0] == stopped[1] >= 3
  assert _latest_step(workdir) == stopped[0]

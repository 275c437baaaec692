"""Multi-process training on localhost: 2 processes x 4 CPU devices (jax.distributed, gloo)
equal the single-process 8-device run, and their checkpoint resumes in one process on another
mesh with the same losses.

Both runs read the batch from 2 fixed data shards (config.data.num_shards), so the global
batches are the same whichever process reads which shard (parallel/host_data.py).
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from configs import pretrain
from data.pipeline import resolve_tokenizer
from training.loop import train_and_evaluate
from training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, STOP = 6, 3
TOL = 1e-5
WORKER = """
import json, sys
from absl import logging
from tests.training.test_multiprocess import small_config
from training.loop import train_and_evaluate
args = json.loads(sys.argv[1])
logging.set_verbosity(logging.INFO)
train_and_evaluate(small_config(args["tokenizer"], args["mesh"]), args["workdir"],
                   stop_after=args["stop_after"])
"""


def small_config(tokenizer, mesh):
  config = pretrain.get_config("tiny")
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                           vocab_size=384))
  config.data.update(dict(tiny_world_train_docs=300, tiny_world_eval_docs=20, seq_len=32,
                          global_batch_size=8, tokenizer_vocab_size=384, tokenizer=tokenizer))
  config.data.num_shards = 2
  config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  config.train.update(dict(steps=STEPS, log_every=1, eval_every=0))
  config.checkpoint.update(dict(every_steps=STOP, max_to_keep=2, async_save=True))
  config.optimizer.update(dict(warmup_steps=2, lr=1e-2))
  return config


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def peer_cache_env(process_id: int) -> dict[str, str]:
  """The compilation-cache directory of one of several processes that run at once.

  JAX writes a cache entry in place, so a process must not share its directory with another
  running beside it (tests/conftest.py): each peer gets its own under the test worker's.
  """
  parent = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  return {"JAX_COMPILATION_CACHE_DIR": os.path.join(parent, f"process_{process_id}")} if parent else {}


def run_two_processes(tokenizer, mesh, workdir, stop_after, timeout=600):
  """Runs `train_and_evaluate` in 2 local processes of 4 CPU devices each; returns their logs.

  Output goes to files, not pipes: a process blocked on a full pipe would stall the other in
  its next collective.
  """
  port = _free_port()
  args = json.dumps(dict(tokenizer=tokenizer, mesh=mesh, workdir=workdir,
                         stop_after=stop_after))
  os.makedirs(workdir, exist_ok=True)
  logs = [os.path.join(workdir, f"process_{i}.log") for i in range(2)]
  procs = []
  for process_id, log in enumerate(logs):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id),
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               **peer_cache_env(process_id))
    with open(log, "w") as out:
      procs.append(subprocess.Popen([sys.executable, "-c", WORKER, args], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    # A process that fails leaves the other waiting in a collective: stop at the first error.
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  texts = []
  for proc, log in zip(procs, logs):
    with open(log) as f:
      texts.append(f.read())
    assert proc.returncode == 0, f"{log}:\n{texts[-1][-4000:]}"
  return texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  config = small_config("", (1, 1, 1))
  resolve_tokenizer(config.data, directory)
  return os.path.join(directory, "tokenizer", "spm.model")


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def test_two_processes_equal_one_and_resume_on_another_mesh(tokenizer, tmp_path):
  reference = str(tmp_path / "one_process")
  train_and_evaluate(small_config(tokenizer, (2, 2, 2)), reference)
  want = _losses(reference)
  assert sorted(want) == list(range(1, STEPS + 1)) and want[STEPS] < want[1]

  workdir = str(tmp_path / "two_processes")
  logs = run_two_processes(tokenizer, (2, 2, 2), workdir, stop_after=STOP)
  got = _losses(workdir)  # written by process 0 alone: each step once
  assert sorted(got) == list(range(1, STOP + 1))
  for step in got:
    assert got[step] == pytest.approx(want[step], abs=TOL), step
  # Only process 0 logs progress; process 1 reports warnings and errors only.
  assert "this host reads data shards [0] of 2" in logs[0]
  assert "this host reads data shards" not in logs[1]

  # The 2-process checkpoint restores in this single process on a (1, 4, 2) mesh.
  final = train_and_evaluate(small_config(tokenizer, (1, 4, 2)), workdir)
  got = _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(STOP + 1, STEPS + 1):
    assert got[step] == pytest.approx(want[step], abs=TOL), step
  assert final["train/loss"] == pytest.approx(want[STEPS], abs=TOL)

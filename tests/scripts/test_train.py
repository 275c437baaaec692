"""scripts.train as a user runs it: a failing run's last line is its reason, not shutdown noise."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.mlp_dim=64",
         "--config.data.tiny_world_train_docs=300", "--config.data.tiny_world_eval_docs=20",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.checkpoint.every_steps=2", "--config.optimizer.warmup_steps=0"]


def train(workdir, *overrides):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "scripts.train", "--config",
                         "configs/pretrain.py:tiny", f"--workdir={workdir}", *SMALL, *overrides],
                        cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=600, check=False)


def last_line(result) -> str:
  return [line for line in result.stderr.splitlines() if line.strip()][-1]


def test_failed_runs_end_with_their_reason(tmp_path):
  workdir = str(tmp_path / "run")
  # A diverging run: stopped at the first non-finite step, before any later checkpoint.
  diverged = train(workdir, "--config.optimizer.lr=1e6", "--config.train.steps=30")
  assert diverged.returncode == 1, diverged.stderr[-3000:]
  assert last_line(diverged).startswith("error: step "), diverged.stderr[-3000:]
  assert "the loss or gradient norm is not finite" in last_line(diverged)
  # Resuming it with another model shape: one line naming the field, not an orbax trace.
  reshaped = train(workdir, "--config.optimizer.lr=1e6", "--config.train.steps=30",
                   "--config.model.d_model=48")
  assert reshaped.returncode == 1, reshaped.stderr[-3000:]
  assert last_line(reshaped).startswith("error: ") and "model.d_model" in last_line(reshaped)
  assert "Traceback" not in reshaped.stderr

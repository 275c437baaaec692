"""Divergence: the loop stops at a non-finite step (or drops its update and counts it) before
any checkpoint could hold non-finite params or push a finite one out."""

import os

import jax
import numpy as np
import pytest

import models  # noqa: F401
from models.build import build_model_spec
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from tests.training.test_loop import small_config
from tests.training.test_step import random_batch, tiny_config
from training.checkpoint import Checkpointer
from training.loop import train_and_evaluate
from training.metrics import read_metrics
from training.optimizer import make_optimizer
from training.outer_loop import NonFiniteError, NonFiniteGuard, StepResult
from training.registry import get_loss_fn
from training.state import create_train_state
from training.step import make_train_step


def test_a_skipped_non_finite_step_changes_nothing_and_is_flagged():
  config = tiny_config()
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  rules = get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  optimizer, schedule = make_optimizer(config.optimizer, 10)
  state, shardings = create_train_state(spec, optimizer, mesh, rules, seed=0)
  step = make_train_step(spec, get_loss_fn("clm"), optimizer, schedule, config.objective,
                         mesh=mesh, rules=rules, shardings=shardings, donate=False,
                         skip_nonfinite=True)
  state, metrics = step(state, random_batch(0))
  assert float(metrics["nonfinite"][0]) == 0.0
  before = jax.device_get(state)
  poisoned = random_batch(1)
  poisoned["loss_mask"][0, 0] = np.nan  # a NaN loss sum
  state, metrics = step(state, poisoned)
  assert float(metrics["nonfinite"][0]) == 1.0 and np.isnan(float(metrics["loss"][0]))
  after = jax.device_get(state)
  # Params and optimizer state bit for bit as before; the step count and RNG move on.
  jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
  jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
  assert int(after["step"]) == int(before["step"]) + 1
  state, metrics = step(state, random_batch(2))
  assert float(metrics["nonfinite"][0]) == 0.0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(state["params"]), before["params"])
  assert max(jax.tree.leaves(moved)) > 0


def _flags(*values):
  return [StepResult(figures={"nonfinite": v}) for v in values]


def test_the_guard_skips_isolated_steps_and_stops_a_streak():
  guard = NonFiniteGuard("skip", max_skips=2)
  for step, result in enumerate(_flags(0.0, 1.0, 1.0, 0.0, 1.0, 0.5), start=1):
    guard.add(step, result)
  guard.check()  # streaks of 2 and 2 (a partly dropped RL iteration counts): allowed
  assert guard.skipped == 4 and guard.in_a_row == 2
  guard.add(7, _flags(1.0)[0])
  with pytest.raises(NonFiniteError, match=r"step 7: 3 steps in a row .*max_nonfinite_skips=2"):
    guard.check()
  stop = NonFiniteGuard("stop", max_skips=10)
  for step, result in enumerate(_flags(0.0, 0.0, 1.0, 1.0), start=11):
    stop.add(step, result)
  with pytest.raises(NonFiniteError, match=r"^step 13: the loss or gradient norm is not finite"):
    stop.check()
  with pytest.raises(ValueError, match="config.train.nonfinite: unknown 'ignore'"):
    NonFiniteGuard("ignore", 1)


def _checkpointed(workdir):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(mode, tmp_path):
  """lr 1e6: the loss stops being finite within a few steps. 'stop' ends the run at that step;
  'skip' drops steps until `max_nonfinite_skips` in a row. Either way no checkpoint is written
  from the first bad step on, and every kept checkpoint is finite."""
  config = small_config(12)
  config.optimizer.update(dict(lr=1e6, warmup_steps=0))
  config.checkpoint.update(dict(every_steps=1, max_to_keep=2))
  config.train.update(dict(log_every=1, eval_every=0, nonfinite=mode, max_nonfinite_skips=2))
  workdir = str(tmp_path / mode)
  with pytest.raises(NonFiniteError, match=r"^step (\d+): ") as error:
    train_and_evaluate(config, workdir)
  bad = int(str(error.value).split()[1].rstrip(":"))
  assert _checkpointed(workdir)[-1] == bad - 1  # checked before the save of step `bad`
  if mode == "skip":  # the two dropped steps before it were logged as such
    nonfinite = {r["step"]: r["train/nonfinite"] for r in read_metrics(workdir)}
    assert nonfinite[bad - 1] == nonfinite[bad - 2] == 1.0
  spec = build_model_spec(config.model)
  params = Checkpointer.restore_params(workdir, spec.shapes)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))

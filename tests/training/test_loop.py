"""train_and_evaluate end to end on a shrunken tiny config: metrics, checkpoints, resume."""

import json
import os

import jax
import numpy as np
import pytest

from configs import pretrain
from training.checkpoint import Checkpointer
from training.loop import train_and_evaluate
from training.metrics import read_metrics


def small_config(steps):
  config = pretrain.get_config("tiny")
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64))
  config.data.update(dict(tiny_world_train_docs=400, tiny_world_eval_docs=40, seq_len=32,
                          global_batch_size=8, tokenizer_vocab_size=384))
  config.model.vocab_size = 384
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  config.train.update(dict(steps=steps, log_every=2, eval_every=4, eval_steps=2))
  config.checkpoint.update(dict(every_steps=3, max_to_keep=5, async_save=True))
  config.optimizer.update(dict(warmup_steps=2, lr=1e-2))
  return config


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  final = train_and_evaluate(small_config(8), workdir)
  return workdir, final


def _params(workdir):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  ckpt.close()
  from models.build import build_model_spec
  spec = build_model_spec(small_config(8).model)
  return step, Checkpointer.restore_params(workdir, spec.shapes)


def test_end_to_end_writes_metrics_checkpoints_and_learns(straight_run):
  workdir, final = straight_run
  records = read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert steps == [2, 4, 6, 8]
  assert all("train/loss" in r and "perf/tokens_per_sec" in r for r in records[1:])
  assert "eval/loss" in records[1] and "eval/loss" in records[3]
  assert records[-1]["train/loss"] < records[0]["train/loss"]
  assert np.isfinite(final["eval/loss"])
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["model"]["d_model"] == 32
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  step, _ = _params(workdir)
  assert step == 8


def test_resume_equals_uninterrupted(straight_run, tmp_path):
  workdir, _ = straight_run
  resumed = str(tmp_path / "resumed")
  train_and_evaluate(small_config(8), resumed, stop_after=4)  # 'killed' at step 4
  train_and_evaluate(small_config(8), resumed)  # the same command again resumes
  want = {r["step"]: r for r in read_metrics(workdir)}
  got = {r["step"]: r for r in read_metrics(resumed)}
  for step in (6, 8):
    assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], abs=1e-6)
    assert got[step]["eval/loss"] == pytest.approx(want[step]["eval/loss"], abs=1e-6) \
        if "eval/loss" in want[step] else True
  _, params_straight = _params(workdir)
  _, params_resumed = _params(resumed)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params_straight, params_resumed)


def test_evaluate_script_reproduces_the_runs_last_eval(straight_run):
  from scripts.evaluate import evaluate_run
  workdir, final = straight_run
  metrics = evaluate_run(workdir, max_batches=small_config(8).train.eval_steps)
  assert metrics["eval/loss"] == pytest.approx(final["eval/loss"], abs=1e-6)
  assert metrics["eval/accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-6)

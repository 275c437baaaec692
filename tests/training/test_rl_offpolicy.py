"""Off-policy, overlapped rollouts (training/rl/offpolicy.py) on 8 CPU devices: staleness 0
equals the synchronous loop exactly; staleness 1 on a 4 + 4 split mesh trains on rollouts of
the previous weights, weighted by pi_old / mu with mu recomputed here, and resumes exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
from configs import grpo as grpo_config
from data.pipeline import resolve_tokenizer
from data.prompts import load_prompts
from objectives import grpo as grpo_lib
from objectives.ppo import truncated_weights
from tests.training.test_rl import runs, shrink  # noqa: F401  (the module's fixture)
from training.checkpoint import Checkpointer
from training.metrics import read_metrics
from training.rl.loop import RLTrainer, train_rl
from training.rl.offpolicy import behaviour_iteration
from training.validate import validate_config
from models.build import build_model_spec
from models.quantize import Int8Weight, quantize_params


def _config(base_dir, **rl):
  config = shrink(grpo_config.get_config("tiny"), base_dir, "", 3)
  config.train.eval_every = 0
  config.rl.update(dict(prompts_per_iteration=4, samples_per_prompt=4, **rl))
  return config


def _trainer(config, workdir, **kw):
  tokenizer = resolve_tokenizer(config.data, workdir)
  return RLTrainer(config, tokenizer=tokenizer,
                   train_items=load_prompts(config, tokenizer, "train", workdir), **kw)


def _host(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def _spy(trainer):
  """Keeps every iteration's completed rollout and its update arrays."""
  seen = []
  algorithm = trainer.algorithm

  def make_batch(rollout, config, kl_coef):
    arrays, figures = algorithm.make_batch(rollout, config, kl_coef)
    seen.append((rollout, arrays))  # the loop adds the importance weights to `arrays`
    return arrays, figures

  trainer.algorithm = dataclasses.replace(algorithm, make_batch=make_batch)
  return seen


def test_staleness_zero_through_stale_rollouts_equals_the_synchronous_loop(runs, tmp_path):
  config = _config(runs[0], epochs=1, minibatches=1)  # one update: compiles least
  trainer = _trainer(config, str(tmp_path), stale_rollouts=True)
  stale = trainer.rollouts
  assert stale is not None and stale.staleness == 0

  def run(rollouts):
    trainer.rollouts = rollouts
    if rollouts is not None:
      rollouts.reset(0)
    state, records = trainer.fresh_state(), []
    for t in range(2):
      state, record, _ = trainer.iteration(state, t, 0.04)
      records.append(record)
    return state, records

  sync_state, sync = run(None)
  state, records = run(stale)
  for a, b in zip(sync, records):
    assert {k: v for k, v in a.items() if k.startswith("train/")} == {
        k: v for k, v in b.items() if k.startswith("train/")}
    assert a["train/staleness"] == 0.0
  for a, b in zip(_host(sync_state["params"]), _host(state["params"])):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def split(runs, tmp_path_factory):
  """GRPO with staleness 1 on 4 rollout + 4 training devices (tensor-parallel 2 on both)."""
  config = _config(runs[0], staleness=1, rollout_devices=4, max_importance_ratio=1.01)
  config.train.steps = 2
  config.mesh.update(dict(data=2, fsdp=1, tensor=2))
  assert validate_config(config, device_count=8) == []
  return config, _trainer(config, str(tmp_path_factory.mktemp("prompts")))


def test_staleness_one_trains_on_the_previous_weights_rollouts(split):
  config, trainer = split
  stale = trainer.rollouts
  rollout_devices = set(stale.mesh.devices.flat)
  train_devices = set(trainer.mesh.devices.flat)
  assert len(rollout_devices) == len(train_devices) == 4 and not rollout_devices & train_devices
  algorithm, seen = trainer.algorithm, _spy(trainer)
  stale.reset(0)
  stale.steps = 3  # the run's 2, and one more iteration here
  state, thetas, records = trainer.fresh_state(), [], []
  try:
    for t in range(3):
      thetas.append(_host(state["params"]))
      state, record, _ = trainer.iteration(state, t, 0.04)
      records.append(record)
  finally:
    trainer.algorithm, stale.steps = algorithm, config.train.steps
  assert [r["train/staleness"] for r in records] == [0.0, 1.0, 1.0]
  assert [behaviour_iteration(t, 1) for t in range(3)] == [0, 0, 1]
  treedef = jax.tree.structure(state["params"])
  params_of = lambda t: jax.device_put(jax.tree.unflatten(treedef, thetas[t]),
                                       trainer.setup.shardings["params"])
  chunks = [np.arange(16)]
  for t in (1, 2):
    rollout, arrays = seen[t]
    mask = rollout.mask
    # mu: the behaviour weights' log-probs, recomputed on the training mesh; pi_old: theta_t.
    mu = trainer.engine.forward(params_of(t - 1), rollout.rows, mask, chunks)["log_probs"]
    old = trainer.engine.forward(params_of(t), rollout.rows, mask, chunks)["log_probs"]
    np.testing.assert_allclose(rollout.behaviour_log_probs, mu, atol=2e-5)
    np.testing.assert_allclose(rollout.log_probs, old, atol=2e-5)
    # The previous weights, not these: an update moved the log-probs well past the tolerance.
    assert np.abs(rollout.behaviour_log_probs - rollout.log_probs).max() > 1e-3
    want, truncated = truncated_weights(old, mu, mask, 1.01)
    np.testing.assert_allclose(arrays["importance_weights"], want, atol=1e-4)
    assert 0 < float(np.asarray(truncated).sum()) < mask.sum()  # the cap binds on some tokens
    assert records[t]["train/importance_truncated"] > 0
    assert records[t]["train/importance_weight"] <= 1.01
  # Iteration 0 samples with theta_0, the weights it trains: the weights are 1 (same code,
  # another mesh: float rounding only).
  np.testing.assert_allclose(seen[0][1]["importance_weights"], seen[0][0].mask, atol=1e-4)
  assert all(np.isfinite(v) for r in records for v in r.values())


def test_staleness_one_resume_equals_uninterrupted(split, tmp_path):
  """The rollout in flight at the checkpoint is regenerated from its saved weights."""
  config, trainer = split
  whole = str(tmp_path / "whole")
  train_rl(config, whole, trainer=trainer)
  resumed = str(tmp_path / "resumed")
  train_rl(config, resumed, trainer=trainer, stop_after=1)
  with Checkpointer(str(tmp_path / "resumed" / "checkpoints")) as ckpt:
    assert ckpt.latest_step() == 1
  train_rl(config, resumed, trainer=trainer)
  want = {r["step"]: r for r in read_metrics(whole)}
  got = {r["step"]: r for r in read_metrics(resumed)}
  for key in ("train/loss", "train/score", "train/kl", "train/importance_weight",
              "train/behaviour_kl", "train/staleness"):
    assert got[2][key] == want[2][key], key
  spec = build_model_spec(config.model)
  a = Checkpointer.restore_params(whole, spec.shapes)
  b = Checkpointer.restore_params(resumed, spec.shapes)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_int8_rollouts_are_weighed_by_the_quantized_policy(runs, tmp_path):
  """rl.rollout_weights int8 at staleness 0: mu is the forward pass of the dequantized
  weights, and the loss weighs each token by min(pi_old / mu, C)."""
  config = _config(runs[0], epochs=1, minibatches=1, rollout_weights="int8")
  trainer = _trainer(config, str(tmp_path))
  # pi_old's pass runs (an on-policy single update would skip it) and mu's too.
  assert trainer.rollouts is not None and trainer.old_log_probs_forward
  assert trainer.engine.rollout_sampler is trainer.rollouts.sample_fn
  seen = _spy(trainer)
  trainer.rollouts.reset(0)
  state = trainer.fresh_state()
  theta = jax.tree.map(np.asarray, state["params"])
  state, record, _ = trainer.iteration(state, 0, 0.04)
  rollout, arrays = seen[0]
  deq = jax.tree.map(lambda x: x.dequantize() if isinstance(x, Int8Weight) else x,
                     quantize_params(trainer.spec, theta),
                     is_leaf=lambda x: isinstance(x, Int8Weight))
  mask, chunks = rollout.mask, [np.arange(len(rollout.mask))]
  mu = trainer.engine.forward(deq, rollout.rows, mask, chunks)["log_probs"]
  np.testing.assert_allclose(rollout.behaviour_log_probs, mu, atol=2e-5)
  old = trainer.engine.forward(theta, rollout.rows, mask, chunks)["log_probs"]
  np.testing.assert_allclose(rollout.log_probs, old, atol=2e-5)
  # The quantized policy is another policy, close to the trained one.
  gap = np.abs(rollout.behaviour_log_probs - rollout.log_probs).max()
  assert 1e-5 < gap < 0.1, gap
  want, _ = truncated_weights(old, mu, mask, config.rl.max_importance_ratio)
  np.testing.assert_allclose(arrays["importance_weights"], want, atol=1e-4)
  assert record["train/staleness"] == 0.0
  assert abs(record["train/behaviour_kl"]) < 0.1 and np.isfinite(record["train/loss"])


def test_truncated_importance_weights_scale_the_policy_term():
  """objectives/grpo.py: w multiplies each token's policy loss, under stop_gradient."""
  log_probs = jnp.array([[-1.0, -0.5, -2.0]])
  old = jnp.array([[-1.1, -0.4, -2.0]])
  behaviour = jnp.array([[-0.6, -0.45, -3.0]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  w, truncated = truncated_weights(old, behaviour, mask, 1.5)
  np.testing.assert_allclose(w, [[np.exp(-0.5), np.exp(0.05), 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(truncated, [[0.0, 0.0, 0.0]])
  w_cap, truncated = truncated_weights(old, behaviour, mask, 1.01)
  np.testing.assert_allclose(w_cap, [[np.exp(-0.5), 1.01, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(truncated, [[0.0, 1.0, 0.0]])

  def loss(lp, weights):
    _, m = grpo_lib.grpo_loss(lp, old, jnp.array([1.0]), mask, clip_eps_low=0.2,
                              loss_type="bnpo", importance_weights=weights)
    return m["loss"][0] / m["loss"][1]

  plain = jax.grad(loss)(log_probs, None)
  weighted = jax.grad(loss)(log_probs, w_cap)
  np.testing.assert_allclose(weighted, plain * w_cap, rtol=1e-6)


def test_off_policy_config_errors_name_their_keys():
  config = grpo_config.get_config("tiny")
  config.rl.update(dict(staleness=-1, rollout_devices=8, max_importance_ratio=0.5,
                        rollout_weights="fp8"))
  problems = "\n".join(validate_config(config, device_count=8))
  for key in ("config.rl.staleness", "config.rl.max_importance_ratio",
              "config.rl.rollout_devices 8 leaves none", "config.rl.rollout_weights 'fp8'"):
    assert key in problems
  config.rl.update(dict(staleness=0, rollout_devices=2, max_importance_ratio=2.0,
                        rollout_weights="int8"))
  assert "needs config.rl.staleness >= 1" in "\n".join(validate_config(config, device_count=8))
  config.rl.staleness = 1
  assert validate_config(config, device_count=8) == []
  # The Pallas decode products are a GPU kernel (models/decode_gemm.py).
  config.rl.decode_gemm = "pallas"
  assert "config.rl.decode_gemm: decode GEMM 'pallas' is a GPU (Triton) kernel" in "\n".join(
      validate_config(config, device_count=8, platform="cpu"))
  assert validate_config(config, device_count=8, platform="gpu") == []
  config.rl.decode_gemm = "cublas"
  assert "config.rl.decode_gemm: unknown decode GEMM 'cublas'" in "\n".join(
      validate_config(config, device_count=8, platform="gpu"))
  config.rl.decode_gemm = "xla"
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))  # 8 devices, 6 left to train on
  assert "the training mesh on the other 6 devices does not fit" in "\n".join(
      validate_config(config, device_count=8))

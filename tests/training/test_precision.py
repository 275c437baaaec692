"""Mixed precision: bfloat16 compute with float32 master params and optimizer state, logits,
log-softmax, losses and reductions in float32; a bf16 run tracks the f32 run's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
from configs import pretrain
from models.build import build_model_spec
from objectives.reductions import finalize_metrics
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.optimizer import make_optimizer
from training.registry import get_loss_fn
from training.state import create_train_state
from training.step import make_train_step

STEPS = 12


def config_for(dtype):
  config = pretrain.get_config("tiny")
  config.model.update(dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           mlp_dim=128, max_length=32, dtype=dtype, param_dtype="float32"))
  config.optimizer.update(dict(warmup_steps=2, lr=1e-2))
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return config


def batches():
  """Four fixed batches of a learnable pattern (token t+1 follows t, with noise), cycled."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(4):
    start = rng.integers(1, 64, (8, 1))
    tokens = ((start + np.arange(17)) % 63 + 1).astype(np.int32)
    noise = rng.random(tokens.shape) < 0.1
    tokens = np.where(noise, rng.integers(1, 64, tokens.shape), tokens).astype(np.int32)
    out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                    loss_mask=np.ones((8, 16), np.float32),
                    segment_ids=np.ones((8, 16), np.int32),
                    positions=np.tile(np.arange(16, dtype=np.int32), (8, 1))))
  return out


def train(dtype):
  config = config_for(dtype)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  rules = get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  optimizer, schedule = make_optimizer(config.optimizer, STEPS)
  state, shardings = create_train_state(spec, optimizer, mesh, rules, seed=0)
  step = make_train_step(spec, get_loss_fn("clm"), optimizer, schedule, config.objective,
                         mesh=mesh, rules=rules, shardings=shardings)
  data = batches()
  hlo = step.lower(state, data[0]).as_text()
  losses = []
  for i in range(STEPS):
    state, metrics = step(state, data[i % len(data)])
    losses.append(float(finalize_metrics(metrics)["loss"]))
  return np.array(losses), state, metrics, hlo, spec


@pytest.fixture(scope="module")
def runs():
  return {dtype: train(dtype) for dtype in ("float32", "bfloat16")}


def test_bf16_tracks_f32_loss(runs):
  f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
  assert f32[-1] < f32[0] - 0.5  # it learns
  np.testing.assert_allclose(bf16, f32, rtol=0.02)
  assert np.abs(bf16 - f32).max() > 1e-5  # bfloat16 really was used


def test_master_params_optimizer_state_and_reductions_stay_f32(runs):
  _, state, metrics, hlo, spec = runs["bfloat16"]
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
  adam = state["opt_state"][1][0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.float32)}
  assert all(s.dtype == jnp.float32 and w.dtype == jnp.float32 for s, w in metrics.values())
  # The matmuls run in bfloat16; the logits come out in float32 for the log-softmax.
  assert "bf16" in hlo and "dot_general" in hlo
  tokens = jnp.ones((2, 16), jnp.int32)
  logits = jax.eval_shape(lambda p: spec.bind(p)(tokens, positions=tokens, segment_ids=tokens),
                          state["params"])
  assert logits.dtype == jnp.float32
  hidden = jax.eval_shape(lambda p: spec.bind(p).hidden_states(
      tokens, positions=tokens, segment_ids=tokens), state["params"])
  assert hidden.dtype == jnp.bfloat16

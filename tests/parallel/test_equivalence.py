"""Sharded training equals single-device training: loss, gradients and params after three
AdamW steps agree within 1e-5 (float32) on every mesh shape and rule preset.

One single-device reference run (module fixture) is compared with each sharded run of the same
shrunken model: d_model 64, 2 layers, 8 heads (so tensor=8 divides heads, KV heads, MLP and
vocab), batch 8 x 16 with packed segments and padding.
"""

import jax
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
from training.state import abstract_train_state, create_train_state, shardings_of
from training.step import make_train_step

TOL = 1e-5


def shrunken_config(data=1, fsdp=1, tensor=1, rules="fsdp_tp"):
  config = pretrain.get_config("tiny")
  config.model.update(dict(vocab_size=64, d_model=64, num_layers=2, num_heads=8,
                           num_kv_heads=8, mlp_dim=128, max_length=32))
  config.optimizer.update(dict(warmup_steps=1, lr=1e-2))
  config.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules))
  return config


def packed_batch(seed, batch=8, length=16, vocab=64):
  """Random tokens, two segments per row at different cuts, padding at the ends."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
  segments = np.ones((batch, length), np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  for row in range(batch):
    cut = 3 + row % 9
    segments[row, cut:] = 2
    positions[row, cut:] -= cut
    segments[row, length - 1 - row % 4:] = 0
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              loss_mask=(segments > 0).astype(np.float32), segment_ids=segments,
              positions=np.where(segments > 0, positions, 0))


BATCHES = [packed_batch(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def initial_state():
  """The reference run's fresh state, on the host: every run starts from these values."""
  config = shrunken_config()
  spec = build_model_spec(config.model)
  optimizer, _ = make_optimizer(config.optimizer, 10)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  state, _ = create_train_state(spec, optimizer, mesh, get_rules(config.mesh.rules), seed=0)
  return jax.device_get(state)


def train(config, devices, initial):
  """(first-step gradients, per-step metrics, final params) of three steps on `devices`."""
  mesh = make_mesh(config.mesh, devices)
  rules = get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  optimizer, schedule = make_optimizer(config.optimizer, 10)
  shardings = shardings_of(abstract_train_state(spec, optimizer, mesh, rules))
  state = jax.device_put(initial, shardings)
  step = make_train_step(spec, get_loss_fn("clm"), optimizer, schedule, config.objective,
                         mesh=mesh, rules=rules, shardings=shardings)
  metrics, grads = [], None
  for batch in BATCHES:
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in finalize_metrics(m).items()})
    if grads is None:
      # After one step Adam's first moment is (1 - b1) * the (clipped) gradient.
      mu = jax.device_get(state["opt_state"][1][0].mu)
      grads = jax.tree.map(lambda x: x / (1 - config.optimizer.b1), mu)
  return grads, metrics, state["params"]


@pytest.fixture(scope="module")
def reference(initial_state):
  grads, metrics, params = train(shrunken_config(), jax.devices()[:1], initial_state)
  return grads, metrics, jax.device_get(params)


@pytest.mark.parametrize("rules, mesh", [
    ("fsdp_tp", (8, 1, 1)), ("fsdp_tp", (1, 8, 1)), ("fsdp_tp", (1, 1, 8)),
    ("fsdp_tp", (2, 2, 2)), ("fsdp_tp", (1, 4, 2)), ("dp", (2, 2, 2)), ("fsdp", (2, 4, 1)),
])
def test_sharded_run_equals_single_device(reference, initial_state, rules, mesh):
  ref_grads, ref_metrics, ref_params = reference
  grads, metrics, params = train(shrunken_config(*mesh, rules=rules), jax.devices()[:8],
                                 initial_state)
  for got, want in zip(metrics, ref_metrics):
    for key in ("loss", "accuracy", "grad_norm"):
      assert abs(got[key] - want[key]) < TOL, (key, got[key], want[key])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOL), grads, ref_grads)
  # The params come back on the sharded mesh and equal to the reference.
  up = params["blocks"]["layers"]["mlp"]["up"]
  assert up.sharding.mesh.devices.shape == mesh
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=TOL),
               params, ref_params)
  # The steps did move the weights (lr 1e-2: AdamW moves each by up to ~1e-2 per step).
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_params, initial_state["params"])
  assert min(jax.tree.leaves(moved)) > 1e-3

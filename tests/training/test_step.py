"""Train step: gradient accumulation equals one big batch; sharded equals one device."""

import jax
import numpy as np
import pytest

import models  # noqa: F401
from configs import pretrain
from models.build import build_model_spec
from objectives.reductions import finalize_metrics
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from training.registry import get_loss_fn
from training.state import create_train_state
from training.step import make_train_step


def tiny_config(**mesh):
  config = pretrain.get_config("tiny")
  config.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           mlp_dim=64, max_length=32))
  config.optimizer.warmup_steps = 2
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  config.mesh.update(mesh)
  return config


def random_batch(seed, batch=8, length=16, vocab=64):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
  # Two segments per row with padding at the end, different split points per row.
  seg = np.ones((batch, length), np.int32)
  positions = np.tile(np.arange(length), (batch, 1)).astype(np.int32)
  for row in range(batch):
    cut = 4 + row % 7
    seg[row, cut:] = 2
    positions[row, cut:] -= cut
    seg[row, length - 1 - row % 3:] = 0
  mask = (seg > 0).astype(np.float32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask, segment_ids=seg,
              positions=np.where(seg > 0, positions, 0))


def run_steps(config, devices, batches, grad_accum_steps=1):
  mesh = make_mesh(config.mesh, devices)
  rules = get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  optimizer, schedule = make_optimizer(config.optimizer, 10)
  state, shardings = create_train_state(spec, optimizer, mesh, rules, seed=0)
  step = make_train_step(spec, get_loss_fn("clm"), optimizer, schedule, config.objective,
                         mesh=mesh, rules=rules, shardings=shardings,
                         grad_accum_steps=grad_accum_steps)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append({k: float(v) for k, v in finalize_metrics(metrics).items()})
  return losses, jax.device_get(state["params"])


BATCHES = [random_batch(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def single_device_run():
  return run_steps(tiny_config(), jax.devices()[:1], BATCHES)


def test_grad_accumulation_equals_one_big_batch(single_device_run):
  ref_losses, ref_params = single_device_run
  losses, params = run_steps(tiny_config(), jax.devices()[:1], BATCHES, grad_accum_steps=4)
  for got, want in zip(losses, ref_losses):
    for k in ("loss", "accuracy", "grad_norm"):
      assert abs(got[k] - want[k]) < 1e-5 * max(1.0, abs(want[k])), k
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, ref_params)


def test_sharded_2x2x2_equals_single_device(single_device_run):
  ref_losses, ref_params = single_device_run
  losses, params = run_steps(tiny_config(data=2, fsdp=2, tensor=2), jax.devices()[:8], BATCHES)
  for got, want in zip(losses, ref_losses):
    assert abs(got["loss"] - want["loss"]) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)


def test_learning_rate_schedule_values():
  config = tiny_config().optimizer
  config.update(dict(lr=1.0, warmup_steps=10, end_lr_ratio=0.1, schedule="cosine"))
  schedule = learning_rate_schedule(config, 110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def test_weight_decay_skips_norms_and_biases():
  params = {"embed": 0, "final_norm": {"scale": 0},
            "blocks": {"attn": {"q": 0, "q_bias": 0}, "mlp_norm": {"scale": 0}}}
  mask = decay_mask(params)
  assert mask == {"embed": True, "final_norm": {"scale": False},
                  "blocks": {"attn": {"q": True, "q_bias": False}, "mlp_norm": {"scale": False}}}

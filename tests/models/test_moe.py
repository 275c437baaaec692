"""Mixture of experts (models/moe.py): grouped-matmul routing equals a per-token dense
reference under both router normalisations, the router losses by hand, their way out of the
decoder into the CLM loss, and a sharded train step (experts split over `data`) equal to one
device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models  # noqa: F401
from configs import pretrain
from configs.models import model_config
from models.build import build_model_spec
from models.flops import matmul_params
from models.moe import MoE, aux_losses, pop_aux
from objectives.reductions import finalize_metrics
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.optimizer import make_optimizer
from training.registry import get_loss_fn
from training.state import abstract_train_state, create_train_state, shardings_of
from training.step import make_train_step
from tests.parallel.test_equivalence import BATCHES


def moe_config(**overrides):
  cfg = model_config("tiny_moe")
  cfg.update(dict(dict(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                       mlp_dim=24, num_experts=4, experts_per_token=2, max_length=32),
                  **overrides))
  return cfg


def reference_moe(layer: MoE, x: np.ndarray, normalize: bool) -> np.ndarray:
  """Token by token: softmax router, its top-k experts, each expert's SwiGLU, weighted sum."""
  router, gate, up, down = (np.asarray(p[...], np.float64) for p in
                            (layer.router, layer.gate, layer.up, layer.down))
  out = np.zeros_like(x, np.float64)
  for t, token in enumerate(x.astype(np.float64)):
    logits = token @ router
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    chosen = np.argsort(-probs, kind="stable")[:layer.k]
    weights = probs[chosen] / (probs[chosen].sum() if normalize else 1.0)
    for e, w in zip(chosen, weights):
      g = token @ gate[e]
      out[t] += w * ((g / (1 + np.exp(-g))) * (token @ up[e])) @ down[e]
  return out


@pytest.mark.parametrize("normalize", [True, False])
def test_grouped_routing_equals_per_token_reference(normalize):
  cfg = moe_config(router_norm_topk=normalize, init_std=0.5)
  layer = MoE(cfg, rngs=nnx.Rngs(params=0))
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 7, 16)), np.float32)
  got = jax.jit(lambda m, v: m(v))(layer, jnp.asarray(x))
  want = reference_moe(layer, x.reshape(-1, 16), normalize).reshape(3, 7, 16)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Each expert got some tokens (the test exercises real grouping, not one block).
  counts = np.bincount(np.asarray(jax.lax.top_k(
      x.reshape(-1, 16) @ np.asarray(layer.router[...]), 2)[1]).ravel(), minlength=4)
  assert (counts > 0).all()


def test_aux_losses_by_hand():
  """E=2, k=1: token probabilities (1/2, 1/2) -> expert 0, (3/4, 1/4) -> 0, (1/4, 3/4) -> 1,
  and a padding token. f = (2/3, 1/3), P = (1/2, 1/2): load = 2 (2/3 . 1/2 + 1/3 . 1/2) = 1.
  log Z = ln 2, ln 4, ln 4: z = (ln2^2 + 2 (2 ln2)^2) / 3 = 3 ln2^2."""
  ln3 = math.log(3.0)
  logits = jnp.array([[0.0, 0.0], [ln3, 0.0], [0.0, ln3], [50.0, -50.0]])
  probs = jax.nn.softmax(logits, axis=-1)
  experts = jax.lax.top_k(probs, 1)[1]
  aux = aux_losses(logits, probs, experts, jnp.array([True, True, True, False]))
  assert abs(float(aux["load_balance"]) - 1.0) < 1e-6
  assert abs(float(aux["router_z"]) - 3 * math.log(2.0) ** 2) < 1e-6


def test_decoder_threads_the_aux_loss_out_and_into_the_clm_loss():
  cfg = moe_config(moe_aux_coef=0.1, moe_z_coef=0.01)
  spec = build_model_spec(cfg)
  params = spec.init(jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in BATCHES[0].items()}
  batch = {k: v[:, :16] for k, v in batch.items()}
  loss_fn = get_loss_fn("clm")

  def forward(params, scanned):
    c = cfg.copy_and_resolve_references()
    c.scan_layers = scanned
    model = build_model_spec(c).bind(params if scanned else unstack(params))
    return loss_fn(model, batch, None, ml_objective(), None)[1]

  def unstack(p):
    layers = p["blocks"]["layers"]
    return {**p, "blocks": {"layers": {i: jax.tree.map(lambda a: a[i], layers)
                                       for i in range(cfg.num_layers)}}}

  metrics = finalize_metrics(forward(params, True))
  flat = finalize_metrics(forward(params, False))
  for key in ("loss", "nll", "moe_load_balance", "moe_router_z"):
    assert abs(metrics[key] - flat[key]) < 1e-5, key
  # The loss is the nll plus the weighted router terms.
  want = metrics["nll"] + 0.1 * metrics["moe_load_balance"] + 0.01 * metrics["moe_router_z"]
  assert abs(metrics["loss"] - want) < 1e-5
  assert 1.0 < metrics["moe_load_balance"] < 4.0     # k = 2 when balanced, E = 4 at worst
  # The router learns from the aux loss: its gradient through load_balance is non-zero.
  model = spec.bind(params)
  model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  assert set(pop_aux(model)) == {"load_balance", "router_z"}

  def load(router):
    p = jax.tree.map(lambda a: a, params)
    p["blocks"]["layers"]["mlp"]["router"] = router
    m = spec.bind(p)
    m(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    return pop_aux(m)["load_balance"]
  assert float(jnp.abs(jax.grad(load)(params["blocks"]["layers"]["mlp"]["router"])).max()) > 0


def ml_objective():
  return pretrain.get_config("tiny").objective


def test_flops_count_active_experts_only():
  cfg = moe_config(expert_mlp_dim=20)
  dense = cfg.copy_and_resolve_references()
  dense.num_experts = 0
  per_layer_mlp_dense = 3 * 16 * 24
  per_layer_moe = 2 * 3 * 16 * 20 + 16 * 4     # k experts of width 20, and the router
  assert matmul_params(cfg) - matmul_params(dense) == 2 * (per_layer_moe - per_layer_mlp_dense)


def train_three_steps(config, devices, initial):
  mesh = make_mesh(config.mesh, devices)
  rules = get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  optimizer, schedule = make_optimizer(config.optimizer, 10)
  shardings = shardings_of(abstract_train_state(spec, optimizer, mesh, rules))
  state = jax.device_put(initial, shardings)
  step = make_train_step(spec, get_loss_fn("clm"), optimizer, schedule, config.objective,
                         mesh=mesh, rules=rules, shardings=shardings)
  metrics = []
  for batch in BATCHES[:2]:
    state, m = step(state, batch)
    metrics.append(finalize_metrics(m))
  return metrics, state["params"]


def test_sharded_experts_equal_one_device():
  def config(data, fsdp, tensor):
    c = pretrain.get_config("tiny")
    c.model = moe_config(d_model=32, num_heads=8, num_kv_heads=8, mlp_dim=16, num_experts=8,
                         moe_aux_coef=0.01, moe_z_coef=0.001)
    c.optimizer.update(dict(warmup_steps=1, lr=1e-2))
    c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor, rules="fsdp_tp_ep"))
    return c
  ref_cfg = config(1, 1, 1)
  spec = build_model_spec(ref_cfg.model)
  optimizer, _ = make_optimizer(ref_cfg.optimizer, 10)
  one = make_mesh(ref_cfg.mesh, jax.devices()[:1])
  initial, _ = create_train_state(spec, optimizer, one, get_rules("fsdp_tp_ep"), seed=0)
  initial = jax.device_get(initial)
  want_metrics, want = train_three_steps(ref_cfg, jax.devices()[:1], initial)
  got_metrics, got = train_three_steps(config(4, 1, 2), jax.devices()[:8], initial)
  gate = got["blocks"]["layers"]["mlp"]["gate"]       # [layers, expert, embed, mlp]
  assert gate.sharding.spec[1] == "data" and gate.addressable_shards[0].data.shape[1] == 2
  for g, w in zip(got_metrics, want_metrics):
    for key in ("loss", "moe_load_balance", "moe_router_z", "grad_norm"):
      assert abs(float(g[key]) - float(w[key])) < 1e-5, (key, g[key], w[key])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               got, jax.device_get(want))

"""Encoder: bidirectional within a segment, packing isolation, the tied MLM head, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import models  # noqa: F401
from configs import base
from configs.models import model_config
from models.build import MODEL_CLASSES, build_model_spec
from models.encoder import Encoder
from parallel.mesh import make_mesh
from parallel.rules import get_rules, tree_shardings

STYLES = {
    "llama": {},
    "bert": dict(norm="layernorm", position="learned", activation="gelu", qkv_bias=True,
                 out_bias=True, mlp_bias=True, num_kv_heads=4),
}


def small_config(**overrides):
  cfg = model_config("tiny")
  cfg.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_length=32))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module", params=sorted(STYLES))
def model(request):
  """(config, params, jitted forward) of one style; every call below is one [1, 12] row, so
  each style compiles once."""
  cfg = small_config(**STYLES[request.param])
  spec = build_model_spec(cfg, "encoder")
  apply = jax.jit(lambda p, t, pos, seg: spec.bind(p)(t, positions=pos, segment_ids=seg))
  forward = lambda p, t, pos, seg: apply(p, *(jnp.asarray(x, jnp.int32) for x in (t, pos, seg)))
  return cfg, jax.jit(spec.init)(jax.random.PRNGKey(0)), forward


def test_registered():
  assert MODEL_CLASSES["encoder"] is Encoder


def test_bidirectional(model):
  _, params, forward = model
  tokens = np.random.default_rng(0).integers(0, 64, (1, 12))
  positions, seg = np.arange(12)[None], np.ones((1, 12))
  base = forward(params, tokens, positions, seg)
  changed = tokens.copy()
  changed[:, 7] = (changed[:, 7] + 1) % 64
  out = forward(params, changed, positions, seg)
  # Unlike the decoder, every earlier position sees the later token too.
  assert bool((jnp.abs(out[:, :7] - base[:, :7]).max(axis=-1) > 1e-6).all())


def test_packed_row_equals_segments_alone(model):
  _, params, forward = model
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, 64, 5), rng.integers(0, 64, 4)
  packed = np.concatenate([doc_a, doc_b, [7, 7, 7]])[None]
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]])
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]])
  out = forward(params, packed, positions, seg)
  # Each document alone in a row (the rest padding, which attends nowhere and is not seen).
  alone = lambda doc: forward(params, np.pad(doc, (0, 12 - len(doc)))[None],
                              np.pad(np.arange(len(doc)), (0, 12 - len(doc)))[None],
                              (np.arange(12) < len(doc))[None])
  np.testing.assert_allclose(out[0, :5], alone(doc_a)[0, :5], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:9], alone(doc_b)[0, :4], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_head_is_tied_to_the_embedding(model):
  cfg, params, _ = model
  assert "lm_head" not in params
  spec = build_model_spec(cfg, "encoder")
  module = spec.bind(params)
  hidden = jax.random.normal(jax.random.PRNGKey(1), (1, 3, cfg.d_model))
  h = hidden @ params["head_dense"] + params["head_bias"]
  h = jax.nn.gelu(h, approximate=True) if cfg.activation == "gelu" else jax.nn.silu(h)
  h = module.head_norm(h)
  expected = h @ params["embed"].T + params["output_bias"]
  np.testing.assert_allclose(module.logits(hidden), expected, atol=1e-5)
  # Scaling the embedding table changes the output layer too: one shared matrix.
  scaled = dict(params, embed=2 * params["embed"])
  np.testing.assert_allclose(spec.bind(scaled).logits(hidden) - params["output_bias"],
                             2 * (expected - params["output_bias"]), rtol=1e-4, atol=1e-5)


def test_params_shard_on_a_mesh():
  cfg = small_config(**STYLES["bert"])
  spec = build_model_spec(cfg, "encoder")
  mesh_cfg = base.base_config().mesh
  mesh_cfg.update(dict(data=2, fsdp=2, tensor=2))
  mesh = make_mesh(mesh_cfg)
  shardings = tree_shardings(spec.logical_axes, spec.shapes, mesh, get_rules("fsdp_tp"))
  assert shardings["head_dense"].spec == P("fsdp", "tensor")
  assert shardings["output_bias"].spec == P("tensor")
  # (tests/training/test_stages_mlm_cpt_distill.py trains the encoder on this mesh.)

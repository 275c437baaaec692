"""Encoder: bidirectional within a segment, packing isolation, the tied MLM head, sharding;
BERT's switches (post-norm blocks, embedding norm, token types, exact GELU)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import models  # noqa: F401
from configs import base
from configs.models import model_config
from models.build import MODEL_CLASSES, build_model_spec
from models.encoder import Encoder, PostNormBlock
from models.layers import MLP
from parallel.mesh import make_mesh
from parallel.rules import get_rules, tree_shardings

STYLES = {
    "llama": {},
    "bert": dict(norm="layernorm", position="learned", activation="gelu", qkv_bias=True,
                 out_bias=True, mlp_bias=True, num_kv_heads=4),
}
# BERT itself (models/convert/families.py `_bert_read`): post-norm, embedding LayerNorm, token
# types, exact GELU, eps 1e-12.
STYLES["bert_post"] = dict(STYLES["bert"], norm_position="post", embed_norm=True,
                           type_vocab_size=2, gelu_approximate=False, norm_eps=1e-12)


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
  h = (jax.nn.gelu(h, approximate=cfg.gelu_approximate) if cfg.activation == "gelu"
       else jax.nn.silu(h))
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
  post = build_model_spec(small_config(**STYLES["bert_post"]), "encoder")
  post_shardings = tree_shardings(post.logical_axes, post.shapes, mesh, get_rules("fsdp_tp"))
  assert post_shardings["type_embed"].spec == P(None, "fsdp")
  assert post_shardings["embed_norm"]["scale"].spec == P(None)
  # (tests/training/test_stages_mlm_cpt_distill.py trains the encoder on this mesh.)


def test_defaults_keep_the_pre_norm_encoder():
  cfg = model_config("tiny")
  assert (cfg.norm_position, cfg.embed_norm, cfg.type_vocab_size, cfg.gelu_approximate) == (
      "pre", False, 0, True)
  assert set(build_model_spec(small_config(), "encoder").shapes) == {
      "embed", "blocks", "final_norm", "head_dense", "head_bias", "head_norm", "output_bias"}
  assert set(build_model_spec(small_config(**STYLES["bert_post"]), "encoder").shapes) == {
      "embed", "pos_embed", "type_embed", "embed_norm", "blocks", "head_dense", "head_bias",
      "head_norm", "output_bias"}
  with pytest.raises(ValueError, match="norm_position"):
    build_model_spec(small_config(norm_position="sandwich"), "encoder")


def test_post_norm_block_normalises_after_each_residual():
  """x1 = LN(x + attn(x)), out = LN(x1 + mlp(x1)); at init (scale 1, bias 0) every output
  token has mean 0 and variance 1, unlike a pre-norm block's residual stream."""
  cfg = small_config(**STYLES["bert_post"])
  block = PostNormBlock(cfg, rngs=nnx.Rngs(params=0), causal=False)
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(2), (1, 6, cfg.d_model))
  positions, seg = jnp.arange(6)[None], jnp.ones((1, 6), jnp.int32)


  @jax.jit
  def both(x):  # one compile for the block and its hand-composed parts
    x1 = block.attn_norm(x + block.attn(x, positions=positions, segment_ids=seg))
    return block(x, positions=positions, segment_ids=seg), block.mlp_norm(x1 + block.mlp(x1))

  out, by_hand = both(x)
  np.testing.assert_allclose(out, by_hand, atol=1e-6)
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.var(-1), 1.0, atol=1e-4)


def test_embed_norm_makes_hidden_states_scale_free(model):
  """With the embedding LayerNorm, scaling word, position and type tables together changes
  nothing downstream; without it (the other styles) it does."""
  cfg, params, _ = model
  spec = build_model_spec(cfg, "encoder")
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (1, 8)))
  kwargs = dict(positions=jnp.arange(8)[None], segment_ids=jnp.ones((1, 8), jnp.int32))
  tables = [k for k in ("embed", "pos_embed", "type_embed") if k in params]
  scaled = dict(params, **{k: 3.0 * params[k] for k in tables})
  diff = float(jnp.abs(spec.bind(scaled).hidden_states(tokens, **kwargs)
                       - spec.bind(params).hidden_states(tokens, **kwargs)).max())
  assert (diff < 1e-4) == cfg.embed_norm, diff


def test_token_types_add_their_embedding_row():
  cfg = small_config(**STYLES["bert_post"])
  spec = build_model_spec(cfg, "encoder")
  params = spec.init(jax.random.PRNGKey(4))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, (1, 8)))
  kwargs = dict(positions=jnp.arange(8)[None], segment_ids=jnp.ones((1, 8), jnp.int32))
  forward = jax.jit(lambda p, types: spec.bind(p)(tokens, token_type_ids=types, **kwargs))
  default = jax.jit(lambda p: spec.bind(p)(tokens, **kwargs))(params)   # None: all type 0
  zeros, ones = jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
  np.testing.assert_allclose(forward(params, zeros), default, atol=1e-6)
  # Type 1 everywhere is type 0 with the table's rows swapped.
  swapped = dict(params, type_embed=params["type_embed"][::-1])
  np.testing.assert_allclose(forward(params, ones), forward(swapped, zeros), atol=1e-5)
  assert float(jnp.abs(forward(params, ones) - default).max()) > 1e-3


def test_exact_gelu_mlp():
  """gelu_approximate=False: 0.5 x (1 + erf(x / sqrt(2))) (Hendrycks & Gimpel, 2016), which
  the tanh form misses by up to ~5e-4 near |x| = 2."""
  cfg = small_config(activation="gelu", d_model=2, mlp_dim=5, gelu_approximate=False)
  mlp = MLP(cfg, rngs=nnx.Rngs(params=0))
  mlp.up[...] = jnp.eye(2, 5) * jnp.array([[1.0], [0.0]])   # hidden 0 = x[0], the rest 0
  mlp.down[...] = jnp.eye(5, 2)                              # out 0 = hidden 0
  x = jnp.array([-3.0, -2.0, -0.5, 0.5, 2.0, 3.0])
  out = mlp(jnp.stack([x, jnp.zeros_like(x)], -1)[None])[0, :, 0]
  want = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()]
  np.testing.assert_allclose(out, want, atol=1e-6)
  # e.g. gelu(2) = 1.954500 exact vs 1.954598 tanh.
  assert abs(float(out[4]) - 1.9545) < 1e-5
  assert float(jnp.abs(out - jax.nn.gelu(x, approximate=True)).max()) > 1e-4

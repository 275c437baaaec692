"""RewardModel: a decoder with a scalar head; params, packing isolation, init from a decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
from configs.models import model_config
from flax import nnx
from models.build import build_model_spec
from models.heads import ScalarHead
from parallel.mesh import make_mesh
from parallel.rules import RULE_PRESETS, get_rules, tree_shardings
from training.checkpoint import Checkpointer


def small_model(tie=False):
  cfg = model_config("tiny")
  cfg.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_length=32, tie_embeddings=tie))
  return cfg


@pytest.fixture(scope="module")
def specs():
  cfg = small_model()
  return build_model_spec(cfg, "decoder"), build_model_spec(cfg, "reward")


def test_params_are_the_decoders_without_lm_head_plus_score(specs):
  decoder, reward = specs
  assert "lm_head" in decoder.shapes and "lm_head" not in reward.shapes
  assert reward.shapes["score"]["kernel"].shape == (32, 1)
  assert reward.logical_axes["score"]["kernel"] == ("embed", "score")
  body = {k: v for k, v in decoder.shapes.items() if k != "lm_head"}
  assert jax.tree.map(lambda s: s.shape, body) == jax.tree.map(
      lambda s: s.shape, {k: v for k, v in reward.shapes.items() if k != "score"})


@pytest.mark.parametrize("rules", sorted(RULE_PRESETS))
def test_every_rule_preset_places_the_head(specs, rules):
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1),
                   jax.devices()[:8])
  shardings = tree_shardings(specs[1].logical_axes, specs[1].shapes, mesh, get_rules(rules))
  assert shardings["score"]["kernel"].spec[1] is None  # the size-1 output is replicated


def test_scores_are_per_token_and_packing_does_not_mix_sequences(specs):
  _, spec = specs
  model = spec.bind(spec.init(jax.random.PRNGKey(0)))
  score = jax.jit(lambda t, p, s: model(t, positions=p, segment_ids=s))  # one shape: 1 compile
  a, b = np.array([5, 9, 12, 7, 3]), np.array([8, 8, 2])
  packed = np.stack([np.concatenate([a, b, [0, 0]]), np.pad(a, (0, 5)), np.pad(b, (0, 7))])
  segments = np.array([[1] * 5 + [2] * 3 + [0, 0], [1] * 5 + [0] * 5, [1] * 3 + [0] * 7])
  positions = np.array([list(range(5)) + list(range(3)) + [0, 0],
                        list(range(5)) + [0] * 5, list(range(3)) + [0] * 7])
  scores = score(packed, positions, segments)
  assert scores.shape == (3, 10) and scores.dtype == jnp.float32
  # Each packed sequence's last-token score is the score of that sequence alone.
  np.testing.assert_allclose(scores[0, 4], scores[1, 4], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores[0, 7], scores[2, 2], rtol=1e-5, atol=1e-6)
  with pytest.raises(TypeError, match="no LM head"):
    model.logits(jnp.zeros((1, 2, 32)))


def test_scalar_head_hand_computed_with_bias():
  cfg = small_model()
  head = ScalarHead(cfg, rngs=nnx.Rngs(params=0), bias=True)
  head.kernel[...] = jnp.arange(32, dtype=jnp.float32)[:, None] / 100
  head.bias[...] = jnp.array([0.5])
  hidden = jnp.ones((2, 3, 32), jnp.bfloat16)
  out = head(hidden)
  assert out.dtype == jnp.float32 and out.shape == (2, 3)
  np.testing.assert_allclose(out, np.full((2, 3), sum(range(32)) / 100 + 0.5), rtol=1e-2)


@pytest.mark.parametrize("tie", [False, True])
def test_init_from_a_decoder_checkpoint_keeps_a_fresh_head(tmp_path, tie):
  cfg = small_model(tie)
  decoder = build_model_spec(cfg, "decoder")
  reward = build_model_spec(cfg, "reward")
  saved = jax.tree.map(lambda x: x + 1.0, decoder.init(jax.random.PRNGKey(1)))
  with Checkpointer(str(tmp_path / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(3, {"params": saved}, force=True)
  fresh = reward.init(jax.random.PRNGKey(2))
  with pytest.raises(KeyError, match="score"):
    Checkpointer.restore_params(str(tmp_path), reward.shapes)
  restored = Checkpointer.restore_params(str(tmp_path), reward.shapes, fresh_params=fresh)
  np.testing.assert_array_equal(restored["score"]["kernel"], fresh["score"]["kernel"])
  np.testing.assert_array_equal(restored["embed"], saved["embed"])
  jax.tree.map(np.testing.assert_array_equal, restored["blocks"], saved["blocks"])

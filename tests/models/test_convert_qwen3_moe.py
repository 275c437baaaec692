"""Qwen3 (q/k norm, head_dim != d_model / heads, GQA, tied and untied), Mixtral and Qwen3-MoE
(routed experts; Mixtral renormalises the top-k weights, this Qwen3-MoE does not) <-> ours: float32 logit parity padded and packed,
exact round trips, KV-cache decoding equal to the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from models import kv_cache
from tests.models import hf_parity as hp
from training.hf_runs import export_hf, import_hf

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
CASES = {
    # head_dim 12 != 32 / 4, untied.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(intermediate_size=48, head_dim=12, tie_word_embeddings=False)),
    "qwen3_tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   dict(intermediate_size=48, head_dim=8, tie_word_embeddings=True)),
    # 4 experts, 2 per token, weights renormalised over the top 2.
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)),
    # 6 experts of width 24, 2 per token, raw softmax weights (norm_topk_prob False).
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=6,
                       num_experts_per_tok=2, norm_topk_prob=False, head_dim=12)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  name = request.param
  root = tmp_path_factory.mktemp(name)
  config_cls, model_cls, extra = CASES[name]
  hf_model = hp.randomize(model_cls(config_cls(**COMMON, **extra)), std=0.3)
  hf_model.save_pretrained(root / "hf")
  model_cfg = import_hf(str(root / "hf"), str(root / "ours"))
  spec, params = hp.restore_ours(str(root / "ours"), model_cfg)
  return name, root, hf_model, model_cfg, spec, params


def test_config_maps_family_features(converted):
  name, _, _, cfg, spec, params = converted
  assert cfg.qk_norm == name.startswith("qwen3")
  assert cfg.head_dim == (12 if name in ("qwen3", "qwen3_moe") else 8)
  assert cfg.num_experts == {"mixtral": 4, "qwen3_moe": 6}.get(name, 0)
  if cfg.num_experts:
    assert cfg.router_norm_topk == (name != "qwen3_moe")
    width = 40 if name == "mixtral" else 24
    assert params["blocks"]["layers"]["mlp"]["gate"].shape == (2, cfg.num_experts, 32, width)
  assert ("lm_head" in params) == (name != "qwen3_tied")


def test_logits_match_with_padding(converted):
  _, _, hf_model, _, spec, params = converted
  assert hp.check_padded_parity(hf_model, spec, params, VOCAB) < hp.TOL


def test_logits_match_packed_documents(converted):
  _, _, hf_model, _, spec, params = converted
  assert hp.check_packed_parity(hf_model, spec, params, VOCAB) < hp.TOL


def test_round_trip_reproduces_tensors_exactly(converted):
  name, root, hf_model, _, _, _ = converted
  written = export_hf(str(root / "ours"), str(root / "back"))   # family inferred
  assert written["model_type"] == name.replace("_tied", "").replace("_norm", "")
  reloaded = CASES[name][1].from_pretrained(str(root / "back")).eval()
  hp.assert_same_state_dict(hf_model, reloaded)


def test_kv_cache_decoding_equals_full_forward(converted):
  _, _, _, cfg, spec, params = converted
  call = jax.jit(lambda tokens, positions, cache=None: spec.bind(params)(
      tokens, positions=positions, segment_ids=jnp.ones_like(tokens), cache=cache))
  tokens = np.random.default_rng(3).integers(1, VOCAB, (1, 9)).astype(np.int32)
  full = np.asarray(call(jnp.asarray(tokens), jnp.arange(9)[None]))
  logits, cache = call(jnp.asarray(tokens[:, :5]), jnp.arange(5)[None],
                       kv_cache.init_cache(cfg, 1, 9))
  got = [np.asarray(logits)[0]]
  for t in range(5, 9):
    logits, cache = call(jnp.asarray(tokens[:, t:t + 1]), jnp.full((1, 1), t), cache)
    got.append(np.asarray(logits)[0])
  np.testing.assert_allclose(np.concatenate(got), full[0], atol=1e-5)

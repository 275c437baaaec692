"""Gemma 2 and Gemma 3 (text) <-> ours: float32 logit parity on padded and packed rows with the
layer stack scanned and unrolled, exact round trips, KV-cache decoding equal to the full
forward.

The tiny models keep every Gemma feature visible at 12 tokens: a window of 4, soft-caps small
enough to bite (Gemma 2), a local RoPE base far from the global one and linear scaling on the
global layers (Gemma 3), head_dim 12 != 32 / 4 and query_pre_attn_scalar 10 != 12. Gemma 2
has 3 layers (local, global, local) and Gemma 3 has 7 (five local, one global, one local), so
the grouped scan (models/layer_pattern.py) runs both a whole period and a tail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from models import kv_cache
from models.build import build_model_spec
from models.layer_pattern import layer_kinds
from tests.models import hf_parity as hp
from training.hf_runs import export_hf, import_hf

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              head_dim=12, intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6,
              sliding_window=4, query_pre_attn_scalar=10)
CASES = {
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(num_hidden_layers=3, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0, tie_word_embeddings=False)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(num_hidden_layers=7, rope_parameters=dict(
                        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
                        sliding_attention=dict(rope_type="default", rope_theta=100.0)))),
}
# Local (True) / global per layer, as HF's layer_types say.
KINDS = {"gemma2": (True, False, True), "gemma3_text": (True,) * 5 + (False, True)}


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


def _unrolled(cfg, params):
  """The same model with `scan_layers` off: config, spec and per-layer params."""
  cfg = cfg.copy_and_resolve_references()
  cfg.scan_layers, cfg.attention = False, "dense"
  stacked = params["blocks"]["layers"]
  layers = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers)}
  return build_model_spec(cfg), dict(params, blocks=dict(layers=layers))


def _max_errors(hf_model, spec, params) -> tuple[float, float]:
  """Largest |ours - HF| logit error on two right-padded rows and on a packed row, run as
  one jitted batch of three rows (one compile)."""
  tokens, mask, positions = hp.padded_batch(VOCAB)
  docs, packed, segments, packed_positions = hp.packed_row(VOCAB)
  ours = np.asarray(jax.jit(lambda t, s, p: spec.bind(params)(t, positions=p, segment_ids=s))(
      np.concatenate([tokens, packed]), np.concatenate([mask, segments]),
      np.concatenate([positions, packed_positions])))
  padded = np.abs(ours[:2] - hp.hf_logits(hf_model, tokens, mask))[mask > 0].max()
  ref = np.concatenate([hp.hf_logits(hf_model, d[None])[0] for d in docs])
  return float(padded), float(np.abs(ours[2] - ref).max())


def test_logits_match_scanned_and_unrolled(converted):
  name, _, hf_model, cfg, _, params = converted
  assert layer_kinds(cfg) == KINDS[name]
  assert (cfg.attn_softcap, cfg.final_softcap) == ((2.0, 3.0) if name == "gemma2" else (0, 0))
  assert cfg.rope_local_theta == (100.0 if name == "gemma3_text" else 0.0)
  # Scanned with 4-row blocks: the blockwise kernel's window skipping and soft-cap.
  scanned = cfg.copy_and_resolve_references()
  scanned.attention_block = 4
  for spec, p in [(build_model_spec(scanned), params), _unrolled(cfg, params)]:
    assert max(_max_errors(hf_model, spec, p)) < hp.TOL


def test_round_trip_reproduces_tensors_exactly(converted):
  name, root, hf_model, _, _, _ = converted
  written = export_hf(str(root / "ours"), str(root / "back"))   # family inferred
  assert written["model_type"] == name
  reloaded = CASES[name][1].from_pretrained(str(root / "back")).eval()
  hp.assert_same_state_dict(hf_model, reloaded)
  assert reloaded.config.layer_types == hf_model.config.layer_types
  assert reloaded.config.rope_parameters == hf_model.config.rope_parameters


def test_kv_cache_decoding_equals_full_forward(converted):
  _, _, _, cfg, spec, params = converted
  call = jax.jit(lambda tokens, positions, cache=None: spec.bind(params)(
      tokens, positions=positions, segment_ids=jnp.ones_like(tokens), cache=cache))
  tokens = np.random.default_rng(3).integers(1, VOCAB, (1, 10)).astype(np.int32)
  full = np.asarray(call(jnp.asarray(tokens), jnp.arange(10)[None]))
  logits, cache = call(jnp.asarray(tokens[:, :5]), jnp.arange(5)[None],
                       kv_cache.init_cache(cfg, 1, 10))
  got = [np.asarray(logits)[0]]
  for t in range(5, 10):   # past the window of 4: local layers drop the oldest keys
    logits, cache = call(jnp.asarray(tokens[:, t:t + 1]), jnp.full((1, 1), t), cache)
    got.append(np.asarray(logits)[0])
  np.testing.assert_allclose(np.concatenate(got), full[0], atol=1e-5)


def test_multimodal_gemma3_imports_its_text_decoder(tmp_path):
  # Gemma 3 4B / 12B / 27B are published as Gemma3ForConditionalGeneration: the text decoder
  # under `language_model.model.*`, a vision tower and projector beside it, and a text_config
  # that lists only what differs from Gemma3TextConfig's defaults.
  text = dict(COMMON, **CASES["gemma3_text"][2])
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14)
  hf_model = hp.randomize(transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=text, vision_config=vision, mm_tokens_per_image=4)), std=0.3)
  hf_model.save_pretrained(tmp_path / "hf")
  model_cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert (model_cfg.num_layers, model_cfg.head_dim, model_cfg.rope_local_theta) == (7, 12, 100.0)
  assert layer_kinds(model_cfg) == KINDS["gemma3_text"]
  spec, params = hp.restore_ours(str(tmp_path / "ours"), model_cfg)
  tokens, mask, positions = hp.padded_batch(VOCAB)
  ours = np.asarray(spec.bind(params)(tokens, positions=positions, segment_ids=mask))
  assert np.abs(ours - hp.hf_logits(hf_model, tokens, mask))[mask > 0].max() < hp.TOL
  # The sparse text_config of a published checkpoint: the defaults fill the rest.
  from models.convert.hf_import import model_config_from_hf
  published = dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                   text_config=dict(hidden_size=2560, intermediate_size=10240,
                                    model_type="gemma3_text", num_hidden_layers=34,
                                    rope_scaling=dict(factor=8.0, rope_type="linear"),
                                    sliding_window=1024))
  cfg = model_config_from_hf(published)
  assert (cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      262208, 2560, 8, 4, 256)
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling.factor) == (1e6, 1e4, 8.0)
  assert (cfg.sliding_window, cfg.sliding_window_pattern, cfg.tie_embeddings) == (1024, 6, True)
  with pytest.raises(ValueError, match="read only"):
    export_hf(str(tmp_path / "ours"), str(tmp_path / "back"), family="gemma3")

"""BERT (BertForMaskedLM) <-> our encoder: post-LayerNorm blocks, embedding LayerNorm,
token-type embeddings, exact GELU, the tied MLM head with its output bias, LayerNorm eps 1e-12.
MLM logit parity (padded, with token types, packed), exact round trips, TF-era tensor names,
the command line, and the MLM stage starting from a conversion."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from configs.run_layout import read_run_config
from models.build import build_model_spec
from tests.models import hf_parity as hp
from training.hf_runs import export_hf, import_hf

# The tiny world's tokenizer size (tests/training), so the stage test below can train on it.
VOCAB = 384


def bert_config(**overrides):
  return transformers.BertConfig(**{**dict(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, hidden_act="gelu"), **overrides})


def random_bert(seed=0):
  """Every weight random; LayerNorm scales near 1 (1 + N(0, 0.2)) rather than near 0, so
  activations reach the range where the GELU forms differ (a test below needs that)."""
  model = hp.randomize(transformers.BertForMaskedLM(bert_config()), seed=seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("LayerNorm.weight"):
        p.add_(1.0)
  return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("bert")
  hf_model = random_bert()
  hf_model.save_pretrained(root / "hf")
  cfg = import_hf(str(root / "hf"), str(root / "ours"))   # kind inferred: "encoder"
  spec, params = hp.restore_ours(str(root / "ours"), cfg, kind="encoder")
  return root, hf_model, cfg, spec, params


def hf_mlm_logits(model, tokens, mask, token_types=None):
  with torch.no_grad():
    types = None if token_types is None else torch.tensor(token_types)
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 token_type_ids=types).logits.numpy()


def our_mlm_logits(spec, params, tokens, mask, positions, token_types=None):
  types = None if token_types is None else jnp.asarray(token_types)
  return np.asarray(spec.bind(params)(jnp.asarray(tokens), positions=jnp.asarray(positions),
                                      segment_ids=jnp.asarray(mask), token_type_ids=types))


def test_config(converted):
  root, _, cfg, _, _ = converted
  assert (cfg.norm, cfg.norm_eps, cfg.position, cfg.activation, cfg.gelu_approximate) == (
      "layernorm", 1e-12, "learned", "gelu", False)
  assert (cfg.norm_position, cfg.embed_norm, cfg.type_vocab_size, cfg.tie_embeddings) == (
      "post", True, 2, True)
  assert (cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias, cfg.num_kv_heads, cfg.mlp_dim) == (
      True, True, True, 4, 64)
  with open(root / "ours" / "config.json", encoding="utf-8") as f:
    assert json.load(f)["stage"] == "convert:encoder"


def test_mlm_logits_match_with_padding(converted):
  """Right padding via attention_mask / segment ids; token types default to 0 on both sides."""
  _, hf_model, _, spec, params = converted
  diff = hp.check_padded_parity(hf_model, spec, params, VOCAB)
  assert diff < hp.TOL, diff


def test_mlm_logits_match_with_token_types(converted):
  _, hf_model, _, spec, params = converted
  tokens, mask, positions = hp.padded_batch(VOCAB, lengths=(12, 9))
  types = (np.arange(12)[None] >= np.array([[5], [4]])).astype(np.int64) * mask
  real = mask > 0
  ref = hf_mlm_logits(hf_model, tokens, mask, types)
  ours = our_mlm_logits(spec, params, tokens, mask, positions, types)
  assert np.abs(ours[real] - ref[real]).max() < hp.TOL
  # All-zero types are what the default (None) means; type 1 changes the logits.
  zeros = our_mlm_logits(spec, params, tokens, mask, positions, np.zeros_like(types))
  np.testing.assert_allclose(zeros, our_mlm_logits(spec, params, tokens, mask, positions),
                             atol=1e-6)
  assert np.abs(ours[real] - zeros[real]).max() > 1e-2


def test_mlm_logits_match_packed_documents(converted):
  """Positions restart per packed document and attention stays inside it, as when each
  document runs alone in HF."""
  _, hf_model, _, spec, params = converted
  docs, tokens, segments, positions = hp.packed_row(VOCAB)
  ours = our_mlm_logits(spec, params, tokens, segments, positions)[0]
  ref = np.concatenate([hf_mlm_logits(hf_model, d[None], np.ones((1, len(d)), np.int64))[0]
                        for d in docs])
  assert np.abs(ours - ref).max() < hp.TOL


def test_exact_gelu_is_what_matches(converted):
  """The tanh approximation is measurably off: parity above needs `gelu_approximate=False`."""
  _, hf_model, cfg, _, params = converted
  approx = cfg.copy_and_resolve_references()
  approx.gelu_approximate = True
  spec = build_model_spec(approx, "encoder")
  assert hp.check_padded_parity(hf_model, spec, params, VOCAB) > 10 * hp.TOL


def test_round_trip_reproduces_tensors_exactly(converted):
  root, hf_model, _, _, _ = converted
  written = export_hf(str(root / "ours"), str(root / "back"))
  assert (written["architectures"], written["model_type"], written["hidden_act"]) == (
      ["BertForMaskedLM"], "bert", "gelu")
  with safe_open(str(root / "hf" / "model.safetensors"), "np") as a, \
      safe_open(str(root / "back" / "model.safetensors"), "np") as b:
    assert set(a.keys()) == set(b.keys())
    for name in a.keys():
      np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name), err_msg=name)
  reloaded = transformers.BertForMaskedLM.from_pretrained(str(root / "back")).eval()
  hp.assert_same_state_dict(hf_model, reloaded)


def test_tf_era_names_and_unused_heads_import(converted, tmp_path):
  """LayerNorm gamma / beta names, a stored (tied) decoder, the pooler and the next-sentence
  head of BertForPreTraining checkpoints: the same params come out."""
  root, _, _, _, params = converted
  with safe_open(str(root / "hf" / "model.safetensors"), "np") as f:
    tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"): f.get_tensor(k) for k in f.keys()}
  tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
  tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
  tensors["bert.pooler.dense.weight"] = np.ones((32, 32), np.float32)
  tensors["cls.seq_relationship.weight"] = np.ones((2, 32), np.float32)
  os.makedirs(tmp_path / "hf")
  save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
  with open(tmp_path / "hf" / "config.json", "w", encoding="utf-8") as f:
    json.dump(dict(bert_config().to_dict(), architectures=["BertForPreTraining"]), f)
  cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  _, again = hp.restore_ours(str(tmp_path / "ours"), cfg, kind="encoder")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               again, params)


def test_unsupported_variants_are_errors(converted, tmp_path):
  _, hf_model, _, _, _ = converted
  untied = transformers.BertForMaskedLM(bert_config(tie_word_embeddings=False))
  untied.save_pretrained(tmp_path / "untied")
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    import_hf(str(tmp_path / "untied"), str(tmp_path / "a"))
  hf_model.save_pretrained(tmp_path / "ok")
  with pytest.raises(ValueError, match="not 'decoder'"):
    import_hf(str(tmp_path / "ok"), str(tmp_path / "b"), kind="decoder")


def test_command_line_round_trip(converted, tmp_path):
  root, hf_model, _, _, _ = converted
  run = hp.run_convert
  out = run("--from-hf", str(root / "hf"), "--to", str(tmp_path / "ours"))
  assert "--config.model.norm_position=post" in out.stdout
  assert "--config.model.type_vocab_size=2" in out.stdout
  run("--from", str(tmp_path / "ours"), "--to-hf", str(tmp_path / "hf"))
  hp.assert_same_state_dict(hf_model, transformers.BertForMaskedLM.from_pretrained(
      str(tmp_path / "hf")))


def test_mlm_stage_starts_from_the_conversion(converted, tmp_path):
  """`--config.init_from` with the converted run's model config: every param is the
  converted one at the start (one step at lr 1e-6 moves none by more than ~lr)."""
  from configs import mlm
  from training.loop import train_and_evaluate
  root, _, _, _, params = converted
  config = mlm.get_config("tiny")
  config.model = read_run_config(str(root / "ours")).model
  config.init_from = str(root / "ours")
  config.data.update(dict(tiny_world_train_docs=300, tiny_world_eval_docs=30, seq_len=32,
                          global_batch_size=8, tokenizer_vocab_size=VOCAB))
  config.train.update(dict(steps=1, log_every=1, eval_every=1, eval_steps=1))
  config.checkpoint.update(dict(every_steps=1, max_to_keep=1))
  config.optimizer.update(dict(warmup_steps=0, lr=1e-6))
  final = train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["eval/loss"])
  _, trained = hp.restore_ours(str(tmp_path), config.model, kind="encoder")
  diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       trained, params)
  assert max(jax.tree.leaves(diffs)) < 1e-5

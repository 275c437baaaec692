"""Sequence classifiers <-> HF `GPT2ForSequenceClassification`, `LlamaForSequenceClassification`
(our "classifier": the label logits at each sequence's last real token) and
`BertForSequenceClassification` (our "encoder_classifier": pooler + classifier at [CLS]), with
3 labels: logits match, padded, packed and (BERT) with token types; the round trip is exact and
keeps the label names; an LM checkpoint imports as a classifier with a fresh head."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.models import hf_parity as hp
from training.hf_runs import export_hf, import_hf

VOCAB = 64
LABELS = 3


def _gpt2():
  return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
      vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=LABELS,
      pad_token_id=0))


def _llama():
  return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_labels=LABELS, pad_token_id=0))


def _bert():
  return transformers.BertForSequenceClassification(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, num_labels=LABELS))


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def converted(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(request.param)
  hf_model = hp.randomize({"gpt2": _gpt2, "llama": _llama, "bert": _bert}[request.param]())
  hf_model.save_pretrained(root / "hf")
  cfg = import_hf(str(root / "hf"), str(root / "ours"))   # kind inferred from the architecture
  kind = "encoder_classifier" if request.param == "bert" else "classifier"
  spec, params = hp.restore_ours(str(root / "ours"), cfg, kind=kind)
  return request.param, root, hf_model, cfg, spec, params


def hf_logits(model, tokens, mask, token_types=None):
  with torch.no_grad():
    extra = {} if token_types is None else {"token_type_ids": torch.tensor(token_types)}
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 **extra).logits.numpy()


def ours(spec, params, tokens, segments, positions, token_types=None):
  extra = {} if token_types is None else {"token_type_ids": jnp.asarray(token_types)}
  return np.asarray(spec.bind(params)(jnp.asarray(tokens), positions=jnp.asarray(positions),
                                      segment_ids=jnp.asarray(segments), **extra))


def test_config_and_head(converted):
  family, _, _, cfg, _, params = converted
  assert cfg.num_labels == LABELS
  if family == "bert":
    assert cfg.classifier_pooler and params["pooler"]["kernel"].shape == (32, 32)
    assert params["classifier"]["kernel"].shape == (32, LABELS) and "head_dense" not in params
  else:
    assert params["score"]["kernel"].shape == (32, LABELS) and "lm_head" not in params


def test_logits_match_padded(converted):
  family, _, hf_model, _, spec, params = converted
  tokens, mask, positions = hp.padded_batch(VOCAB, lengths=(12, 7, 9))
  types = None
  if family == "bert":  # a sentence pair in each row: types 1 on its second part
    types = np.where((np.arange(12)[None] >= 4) & (mask > 0), 1, 0)
  ref = hf_logits(hf_model, tokens, mask, types)
  out = ours(spec, params, tokens, mask, positions, types)
  read = np.zeros(3, int) if family == "bert" else mask.sum(1) - 1
  got = out[np.arange(3), read]
  assert got.shape == ref.shape == (3, LABELS)
  np.testing.assert_allclose(got, ref, atol=hp.TOL)


def test_logits_match_packed(converted):
  family, _, hf_model, _, spec, params = converted
  docs, tokens, segments, positions = hp.packed_row(VOCAB, lengths=(5, 7))
  out = ours(spec, params, tokens, segments, positions)[0]
  read = [0, 5] if family == "bert" else [4, 11]
  ref = np.concatenate([hf_logits(hf_model, d[None], np.ones((1, len(d)), np.int64))
                        for d in docs])
  np.testing.assert_allclose(out[read], ref, atol=hp.TOL)


def test_round_trip_is_exact(converted):
  family, root, hf_model, _, _, _ = converted
  written = export_hf(str(root / "ours"), str(root / "back"))
  name = {"gpt2": "GPT2", "llama": "Llama", "bert": "Bert"}[family]
  assert written["architectures"] == [f"{name}ForSequenceClassification"]
  assert written["problem_type"] == "single_label_classification"
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(root / "back"))
  assert reloaded.config.num_labels == LABELS
  hp.assert_same_state_dict(hf_model, reloaded)


def test_lm_checkpoint_imports_with_a_fresh_head(tmp_path):
  """BERT's MLM checkpoint as a 5-label classifier: body as converted, MLM head dropped,
  pooler and classifier fresh (N(0, init_std), zero biases)."""
  hf_model = hp.randomize(transformers.BertModel(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64)))
  hf_model.save_pretrained(tmp_path / "hf")
  cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"), kind="encoder_classifier",
                  num_labels=5)
  _, params = hp.restore_ours(str(tmp_path / "ours"), cfg, kind="encoder_classifier")
  assert cfg.num_labels == 5 and params["classifier"]["kernel"].shape == (32, 5)
  np.testing.assert_array_equal(np.asarray(params["classifier"]["bias"]), 0)
  assert 0 < float(np.std(np.asarray(params["classifier"]["kernel"]))) < 0.05
  state = hf_model.state_dict()
  np.testing.assert_array_equal(np.asarray(params["pooler"]["bias"]),
                                state["pooler.dense.bias"].numpy())

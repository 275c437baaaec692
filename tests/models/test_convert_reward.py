"""Reward-model heads <-> HF `LlamaForSequenceClassification` (num_labels=1): the reward at
each sequence's last real token matches, padded and packed; the round trip is exact."""

import numpy as np
import pytest
import transformers

from tests.models import hf_parity as hp
from training.hf_runs import export_hf, import_hf

VOCAB = 64


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("reward")
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
  hf_model = hp.randomize(transformers.LlamaForSequenceClassification(config))
  hf_model.save_pretrained(root / "hf")
  cfg = import_hf(str(root / "hf"), str(root / "ours"))   # kind inferred: "reward"
  spec, params = hp.restore_ours(str(root / "ours"), cfg, kind="reward")
  return root, hf_model, spec, params


def scores(spec, params, tokens, segments, positions):
  # RewardModel.__call__: per-token scores [batch, length].
  return hp.our_hidden_or_logits(spec, params, tokens, segments, positions)


def test_reward_matches_at_last_real_token(converted):
  _, hf_model, spec, params = converted
  assert "lm_head" not in params and params["score"]["kernel"].shape == (32, 1)
  tokens, mask, positions = hp.padded_batch(VOCAB, lengths=(12, 7, 9))
  ref = hp.hf_logits(hf_model, tokens, mask)[:, 0]
  ours = scores(spec, params, tokens, mask, positions)
  last = mask.sum(1) - 1
  np.testing.assert_allclose(ours[np.arange(3), last], ref, atol=hp.TOL)


def test_reward_matches_for_packed_sequences(converted):
  _, hf_model, spec, params = converted
  docs, tokens, segments, positions = hp.packed_row(VOCAB, lengths=(5, 7))
  ours = scores(spec, params, tokens, segments, positions)[0]
  ref = [hp.hf_logits(hf_model, d[None])[0, 0] for d in docs]
  np.testing.assert_allclose([ours[4], ours[11]], ref, atol=hp.TOL)


def test_round_trip_reproduces_tensors_exactly(converted):
  root, hf_model, _, _ = converted
  written = export_hf(str(root / "ours"), str(root / "back"))
  assert written["architectures"] == ["LlamaForSequenceClassification"]
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(root / "back"))
  assert reloaded.config.num_labels == 1
  hp.assert_same_state_dict(hf_model, reloaded)

"""GPT-2 <-> ours: LayerNorm, learned positions, tanh GELU, biases everywhere, tied embeddings
and Conv1D `[in, out]` weights with a fused c_attn; plus the command line."""

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.models import hf_parity as hp
from training.hf_runs import export_hf, import_hf

VOCAB = 80


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("gpt2")
  config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                   n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0)
  hf_model = hp.randomize(transformers.GPT2LMHeadModel(config))
  hf_model.save_pretrained(root / "hf")
  cfg = import_hf(str(root / "hf"), str(root / "ours"))
  spec, params = hp.restore_ours(str(root / "ours"), cfg)
  return root, hf_model, cfg, spec, params


def test_config(converted):
  _, _, cfg, _, _ = converted
  assert (cfg.norm, cfg.position, cfg.activation, cfg.tie_embeddings) == (
      "layernorm", "learned", "gelu", True)
  assert (cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias, cfg.mlp_dim, cfg.max_length) == (
      True, True, True, 128, 32)


def test_logits_match_with_padding(converted):
  _, hf_model, _, spec, params = converted
  assert hp.check_padded_parity(hf_model, spec, params, VOCAB) < hp.TOL


def test_logits_match_packed_documents(converted):
  """Learned positions restart per packed document, as when each runs alone in HF."""
  _, hf_model, _, spec, params = converted
  assert hp.check_packed_parity(hf_model, spec, params, VOCAB) < hp.TOL


def test_round_trip_reproduces_tensors_exactly(converted):
  root, hf_model, _, _, _ = converted
  written = export_hf(str(root / "ours"), str(root / "back"))
  assert written["architectures"] == ["GPT2LMHeadModel"]
  hp.assert_same_state_dict(hf_model, transformers.GPT2LMHeadModel.from_pretrained(
      str(root / "back")))


def test_unprefixed_base_model_checkpoint_imports(converted, tmp_path):
  """Checkpoints saved as GPT2Model ("h.0.attn...", no "transformer.") import the same."""
  _, hf_model, _, _, params = converted
  hf_model.transformer.save_pretrained(tmp_path / "base")
  cfg = import_hf(str(tmp_path / "base"), str(tmp_path / "ours"))
  _, again = hp.restore_ours(str(tmp_path / "ours"), cfg)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               again, params)


def test_command_line_round_trip(converted, tmp_path):
  root, hf_model, _, _, _ = converted
  run = hp.run_convert
  out = run("--from-hf", str(root / "hf"), "--to", str(tmp_path / "ours"))
  assert "--config.init_from=" in out.stdout and "--config.model.position=learned" in out.stdout
  run("--from", str(tmp_path / "ours"), "--to-hf", str(tmp_path / "hf"), "--dtype", "bfloat16")
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"))
  assert reloaded.transformer.wte.weight.dtype == torch.bfloat16
  np.testing.assert_allclose(reloaded.transformer.h[1].mlp.c_fc.weight.detach().float().numpy(),
                             hf_model.transformer.h[1].mlp.c_fc.weight.detach().numpy(),
                             rtol=1e-2)

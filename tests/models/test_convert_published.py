"""Checkpoints as published: base models without their task head, with or without the
`model.` / `bert.` scope; sharded bf16 / f32 safetensors both ways; one-line errors naming
file and tensor; `scripts.convert --inspect`."""

import json
import logging
import os
import re
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from models.convert.errors import ConversionError
from models.convert.inspection import describe_checkpoint
from models.convert.safetensors_io import INDEX_FILE, HFReader, HFWriter
from tests.models import hf_parity as hp
from training.hf_runs import export_hf, import_hf

VOCAB = 96


def llama_config(**extra):
  return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, **extra)


def bert_config():
  return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=64)


def convert_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "scripts.convert", *args], capture_output=True,
                        text=True, env=env, check=False)


def numpy_tree(params):
  return jax.tree.map(np.asarray, params)


def test_llama_base_model_gets_a_fresh_lm_head(tmp_path, caplog):
  full = hp.randomize(transformers.LlamaForCausalLM(llama_config()))
  full.save_pretrained(tmp_path / "full")
  full.model.save_pretrained(tmp_path / "base")       # LlamaModel: no "model.", no lm_head
  with caplog.at_level(logging.INFO):
    cfg = import_hf(str(tmp_path / "base"), str(tmp_path / "ours"))
  fresh_lines = [r.getMessage() for r in caplog.records if "initialised fresh" in r.getMessage()]
  assert len(fresh_lines) == 1 and "lm_head.weight -> lm_head" in fresh_lines[0]
  _, ours = hp.restore_ours(str(tmp_path / "ours"), cfg)
  import_hf(str(tmp_path / "full"), str(tmp_path / "ours_full"))
  _, want = hp.restore_ours(str(tmp_path / "ours_full"), cfg)
  ours, want = numpy_tree(ours), numpy_tree(want)
  head = ours.pop("lm_head")
  want.pop("lm_head")
  jax.tree.map(np.testing.assert_array_equal, ours, want)          # the body, exactly
  assert head.shape == (32, VOCAB) and abs(head.std() - cfg.init_std) < 0.2 * cfg.init_std
  # Export writes the causal LM transformers loads, its body the base model's.
  export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back"))
  hp.assert_same_state_dict(full.model, back.model)
  np.testing.assert_array_equal(back.lm_head.weight.detach().numpy(), head.T)


def test_tied_qwen2_base_model_is_the_whole_lm(tmp_path, caplog):
  full = hp.randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)))
  full.model.save_pretrained(tmp_path / "base")
  with caplog.at_level(logging.INFO):
    cfg = import_hf(str(tmp_path / "base"), str(tmp_path / "ours"))
  assert not any("initialised fresh" in r.getMessage() for r in caplog.records)
  spec, params = hp.restore_ours(str(tmp_path / "ours"), cfg)
  assert hp.check_padded_parity(full, spec, params, VOCAB) < hp.TOL


def test_bert_model_without_prefix_gets_a_fresh_mlm_head(tmp_path, caplog):
  body = hp.randomize(transformers.BertModel(bert_config()))
  body.save_pretrained(tmp_path / "base")              # "embeddings...", pooler, no "cls."
  with caplog.at_level(logging.INFO):
    cfg = import_hf(str(tmp_path / "base"), str(tmp_path / "ours"))
  assert sum("initialised fresh" in r.getMessage() for r in caplog.records) == 1
  spec, params = hp.restore_ours(str(tmp_path / "ours"), cfg, kind="encoder")
  np.testing.assert_array_equal(params["head_norm"]["scale"], np.ones(32))
  np.testing.assert_array_equal(params["output_bias"], np.zeros(VOCAB))
  tokens, mask, positions = hp.padded_batch(VOCAB)
  with torch.no_grad():
    ref = body(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)
               ).last_hidden_state.numpy()
  ours = hp.our_hidden_or_logits(spec, params, tokens, mask, positions, hidden=True)
  assert np.abs(ours - ref)[mask > 0].max() < hp.TOL
  export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "back"))
  for name, value in back.bert.state_dict().items():
    assert torch.equal(value, body.state_dict()[name]), name


def test_causal_lm_into_a_reward_model(tmp_path, caplog):
  """The LM head has no place in a reward model (dropped), the score head starts fresh."""
  full = hp.randomize(transformers.LlamaForCausalLM(llama_config()))
  full.save_pretrained(tmp_path / "hf")
  with caplog.at_level(logging.INFO):
    cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"), kind="reward")
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "score.weight -> score/kernel" in messages and "['lm_head.weight']: dropped" in messages
  _, params = hp.restore_ours(str(tmp_path / "ours"), cfg, kind="reward")
  assert "lm_head" not in params and params["score"]["kernel"].shape == (32, 1)


def test_partial_head_is_an_error(tmp_path):
  model = hp.randomize(transformers.BertForMaskedLM(bert_config()))
  model.save_pretrained(tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["cls.predictions.transform.dense.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ConversionError, match="missing HF tensor cls.predictions.transform.dense"):
    import_hf(str(tmp_path), str(tmp_path / "ours"))


def test_writer_and_reader_round_trip_bf16_and_f32_shards(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {f"t{i}.{dtype.__name__}": rng.standard_normal((7, 9)).astype(dtype)
             for i in range(4) for dtype in (np.float32, ml_dtypes.bfloat16)}
  with HFWriter(str(tmp_path), max_shard_bytes=400) as writer:
    for name, array in tensors.items():
      writer.add(name, array)
  shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(shards) >= 4 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}" \
      ".safetensors"
  with open(tmp_path / INDEX_FILE, encoding="utf-8") as f:
    index = json.load(f)
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
  with HFReader(str(tmp_path)) as reader:
    assert reader.keys() == sorted(tensors)
    for name, array in tensors.items():
      got = reader.get(name)
      assert got.dtype == array.dtype and reader.info(name) == (
          (7, 9), "BF16" if "bfloat16" in name else "F32")
      np.testing.assert_array_equal(got, array)


def test_sharded_bf16_checkpoint_round_trip_and_inspect(tmp_path):
  model = hp.randomize(transformers.LlamaForCausalLM(llama_config())).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "hf" / INDEX_FILE)
  report = describe_checkpoint(str(tmp_path / "hf"))
  total = sum(p.numel() for p in model.parameters())
  assert f"{total:,} parameters (BF16 {len(model.state_dict())})" in report
  assert "family: llama -> our decoder model" in report
  assert re.search(r"model.layers.\{i\}.self_attn.q_proj.weight +x2 +\(32, 32\) +BF16 +-> "
                   r"blocks/layers/attn/q\n", report)
  cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))   # stored float32
  _, params = hp.restore_ours(str(tmp_path / "ours"), cfg)
  assert params["embed"].dtype == np.float32
  export_hf(str(tmp_path / "ours"), str(tmp_path / "back"), dtype="bfloat16",
            max_shard_bytes=20_000)
  assert os.path.exists(tmp_path / "back" / INDEX_FILE)
  hp.assert_same_state_dict(model, transformers.LlamaForCausalLM.from_pretrained(
      str(tmp_path / "back"), dtype=torch.bfloat16))


def test_inspect_a_base_model_on_the_command_line(tmp_path):
  hp.randomize(transformers.BertModel(bert_config())).save_pretrained(tmp_path)
  out = convert_cli("--inspect", str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "family: bert -> our encoder model" in out.stdout
  assert "pooler.dense.weight" in out.stdout and "ignored" in out.stdout
  assert "absent head, initialised fresh: cls.predictions.transform.dense.weight" in out.stdout
  assert not (tmp_path / "ours").exists()


def test_errors_are_one_line_naming_file_and_tensor(tmp_path):
  model = hp.randomize(transformers.LlamaForCausalLM(llama_config()))
  model.save_pretrained(tmp_path / "hf")
  with open(tmp_path / "hf" / "config.json", encoding="utf-8") as f:
    config = json.load(f)
  config["intermediate_size"] = 40                # the weights say 48
  with open(tmp_path / "hf" / "config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  out = convert_cli("--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "ours"))
  assert out.returncode == 1 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "model.safetensors: tensor " in last
  assert "mlp.down_proj.weight has shape (32, 48)" in last or "proj.weight has shape (48" in last
  # A body tensor missing, an unsupported family: in process, the same error type.
  tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
  config["intermediate_size"] = 48
  with open(tmp_path / "hf" / "config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(ConversionError, match=r"missing HF tensor model.layers.1.self_attn.k_proj"
                     r".weight \(for our attn/k of layer 1\)"):
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  with open(tmp_path / "hf" / "config.json", "w", encoding="utf-8") as f:
    json.dump(dict(config, model_type="falcon"), f)
  with pytest.raises(ConversionError, match=r"config.json: HF model_type 'falcon'"):
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  out = convert_cli("--from", str(tmp_path / "nothing"), "--to-hf", str(tmp_path / "x"))
  assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in out.stderr

"""A converted Hugging Face checkpoint (with a tokenizer.json) works with every entry point:
scripts.generate (greedy == transformers' greedy `generate`), scripts.chat's session,
scripts.evaluate (held-out loss == transformers' loss on the same document) and a training
stage's `init_from` (a zero learning rate keeps every converted param)."""

import json
import math

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import cpt
from configs.run_layout import read_run_config
from data.tokenizer import load_tokenizer
from scripts.chat import ChatSession
from scripts.evaluate import evaluate_run
from scripts.generate import generate_file, load_decoder, prompt_tokens
from tests.models import hf_checkpoints, hf_parity as hp
from training.hf_runs import import_hf
from training.loop import train_and_evaluate

VOCAB = 320
PROMPTS = ["The river town", "Mara sells salt to"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_run")
  hf_dir = hf_checkpoints.write_tokenizer(str(root / "hf"), VOCAB)
  config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=True, eos_token_id=hf_checkpoints.EOS_ID,
      pad_token_id=hf_checkpoints.PAD_ID)
  hf_model = hp.randomize(transformers.Qwen2ForCausalLM(config), std=0.1)
  hf_model.save_pretrained(hf_dir)
  model_cfg = import_hf(hf_dir, str(root / "ours"))
  return root, hf_model, model_cfg


def hf_greedy(hf_model, ids, stops):
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                            eos_token_id=stops, pad_token_id=hf_checkpoints.PAD_ID)
  return out[0, len(ids):].tolist()


def test_generate_is_transformers_greedy(converted, tmp_path):
  root, hf_model, _ = converted
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  model = load_decoder(str(root / "ours"))
  done = generate_file(model, str(prompts), str(tmp_path / "out.jsonl"),
                       max_new_tokens=MAX_NEW, batch_size=2)
  assert done.count == 2
  lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  for prompt, line in zip(PROMPTS, lines):
    ids = prompt_tokens(model.tokenizer, prompt, "none")
    assert ids[0] == hf_checkpoints.EOS_ID          # no BOS in this tokenizer: EOS frames
    assert line["tokens"] == hf_greedy(hf_model, ids, [hf_checkpoints.EOS_ID])
    assert len(line["tokens"]) == MAX_NEW


def test_chat_session_is_transformers_greedy(converted):
  root, hf_model, _ = converted
  model = load_decoder(str(root / "ours"))
  session = ChatSession(model, template="chatml", max_new_tokens=MAX_NEW)
  reply = session.reply("Where is the river town?")
  ids = prompt_tokens(model.tokenizer, tuple(session.turns[:1]), "chatml")
  stops = sorted({hf_checkpoints.EOS_ID, model.tokenizer.token_to_id("<|im_end|>")})
  want = hf_greedy(hf_model, ids, stops)
  if want and want[-1] in stops:
    want = want[:-1]
  assert reply == model.tokenizer.decode(want)
  assert session.turns[-1].role == "assistant" and session.turns[-1].content == reply


def test_evaluate_is_transformers_loss(converted, tmp_path):
  root, hf_model, _ = converted
  text = "The river town trades salt for copper every spring."
  (tmp_path / "eval.jsonl").write_text(json.dumps({"text": text}) + "\n")
  metrics = evaluate_run(str(root / "ours"), eval_files=str(tmp_path / "eval.jsonl"))
  tok = load_tokenizer(str(root / "ours" / "tokenizer"))
  ids = tok.encode(text, add_bos=True) + [tok.eos_id]
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
  assert math.isclose(metrics["eval/nll"], want, rel_tol=1e-5), (metrics, want)


def test_training_stage_starts_from_the_conversion(converted, tmp_path):
  root, _, model_cfg = converted
  config = cpt.get_config("tiny")
  config.init_from = str(root / "ours")
  config.model = model_cfg
  config.data.update(dict(tiny_world_train_docs=200, tiny_world_eval_docs=20, seq_len=32,
                          global_batch_size=8, tokenizer_vocab_size=VOCAB, replay_source="",
                          replay_weight=0.0))
  config.train.update(dict(steps=1, log_every=1, eval_every=1, eval_steps=1))
  config.checkpoint.update(dict(every_steps=1, max_to_keep=1, async_save=False))
  config.optimizer.update(dict(lr=0.0, warmup_steps=0))
  final = train_and_evaluate(config, str(tmp_path / "cpt"))
  assert np.isfinite(final["eval/loss"])
  assert read_run_config(str(tmp_path / "cpt")).data.tokenizer.endswith("tokenizer.json")
  _, trained = hp.restore_ours(str(tmp_path / "cpt"), model_cfg)
  _, start = hp.restore_ours(str(root / "ours"), model_cfg)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               trained, start)

"""The SFT stage end to end on a shrunken model, and its held-out generation evaluation."""

import json
import os

import jax
import numpy as np
import pytest

import models  # noqa: F401
from configs import sft as sft_config
from data import chat_template
from data import tiny_tasks
from data import tiny_world
from data import verifiers
from data.conversation import Turn
from data.tokenizer import Tokenizer, train_sentencepiece
from models.build import build_model_spec
from models.sampler import SampleOutput
from training.checkpoint import Checkpointer
from training.loop import train_and_evaluate
from training.metrics import read_metrics
from training.registry import get_stage
from training.stage import EvalContext
from training.stages import sft as sft_stage

VOCAB = 384
OFFSET = 0.3  # added to every base param, so loading them is visible in the SFT params


def small_config(base_dir, steps=6):
  config = sft_config.get_config("tiny")
  config.init_from = base_dir
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                           vocab_size=VOCAB))
  config.data.update(dict(tiny_task_train_records=200, tiny_task_eval_records=20, seq_len=64,
                          global_batch_size=8, tokenizer_vocab_size=VOCAB, pack_bins=4,
                          tiny_world_train_docs=200))  # the replayed pretraining prose
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  config.train.update(dict(steps=steps, log_every=2, eval_every=steps, eval_steps=2))
  config.checkpoint.update(dict(every_steps=100, async_save=False))
  config.optimizer.update(dict(warmup_steps=1, lr=1e-2))
  config.eval.update(dict(num_prompts=8, max_new_tokens=8, batch_size=8))
  return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A stand-in pretraining run: its tokenizer and a checkpoint of (offset) random params."""
  base = tmp_path_factory.mktemp("base")
  train_sentencepiece(tiny_world.generate_documents("train", 1500),
                      str(base / "tokenizer" / "spm"), VOCAB)
  spec = build_model_spec(small_config(str(base)).model)
  params = jax.tree.map(lambda x: x + OFFSET, spec.init(jax.random.PRNGKey(123)))
  with Checkpointer(str(base / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(10, {"params": params}, force=True)
  return str(base), params


@pytest.fixture(scope="module")
def sft_run(base_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  final = train_and_evaluate(small_config(base_run[0]), workdir)
  return workdir, final


def test_sft_run_end_to_end(base_run, sft_run):
  base_dir, base_params = base_run
  workdir, final = sft_run
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [2, 4, 6]
  assert records[-1]["train/loss"] < records[0]["train/loss"]
  for key in ("eval/answer_accuracy", "eval/exact_match", "eval/stop_rate"):
    assert 0.0 <= final[key] <= 1.0
  assert np.isfinite(final["eval/loss"])
  # The tokenizer followed init_from and was copied into the run, so the SFT run can be
  # started from in turn.
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["data"]["tokenizer"] == os.path.join(base_dir, "tokenizer", "spm.model")
  assert open(os.path.join(workdir, "tokenizer", "spm.model"), "rb").read() == open(
      config["data"]["tokenizer"], "rb").read()
  # Params started from the base run's: 6 Adam steps of lr <= 1e-2 move each by < 0.07.
  spec = build_model_spec(small_config(base_dir).model)
  params = Checkpointer.restore_params(workdir, spec.shapes)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params,
                                       base_params))
  assert max(moved) < 0.07


def _context(config, tok=None):
  spec = build_model_spec(config.model)
  return EvalContext(config, tok, spec, None, None, "")


def test_evaluate_scores_replies_of_a_stand_in_sampler(base_run):
  """Even prompts get the reference reply and its end-of-turn token, odd ones ramble on to
  max_new_tokens: accuracy, exact match and stop rate are all exactly 1/2."""
  config = small_config(base_run[0])
  tok = Tokenizer.load(os.path.join(base_run[0], "tokenizer", "spm.model"))
  items = sft_stage.held_out_prompts(config)
  assert len(items) == 8 and len({it.context[0].content for it in items}) == 8
  validation = {q.text for q in tiny_tasks.questions("validation", 500)}
  assert all(it.context[0].content in validation for it in items)
  calls = []

  def fake_generate(params, prompts, *, max_new_tokens, eos_id, pad_id, stop_ids,
                    temperature):
    calls.append(dict(prompts=prompts, eos_id=eos_id, stop_ids=stop_ids,
                      temperature=temperature))
    rows = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i in range(len(prompts)):
      reply = (chat_template.render_completion(tok, items[i].reference) if i % 2 == 0 else
               (tok.encode("The market is far away and") * 9))[:max_new_tokens]
      rows[i, :len(reply)], lengths[i] = reply, len(reply)
    return SampleOutput(rows, np.zeros(rows.shape, np.float32),
                        (rows != pad_id).astype(np.float32), lengths)

  config.eval.max_new_tokens = 40
  evaluator = sft_stage.GenerationEvaluator(_context(config, tok=tok), generate=fake_generate)
  metrics = evaluator(None)
  assert metrics == {"eval/answer_accuracy": 0.5, "eval/exact_match": 0.5,
                     "eval/stop_rate": 0.5}
  [call] = calls
  end_of_turn = tok.token_to_id("<|end_of_turn|>")
  assert call["stop_ids"] == [end_of_turn, tok.eos_id] and call["eos_id"] == tok.eos_id
  assert call["temperature"] == 0.0
  assert call["prompts"][0] == chat_template.render_prompt(tok, items[0].context)
  assert call["prompts"][0][-1] == tok.token_to_id("<|assistant|>")


def test_held_out_prompts_from_files(base_run, tmp_path):
  config = small_config(base_run[0])
  eval_path = tmp_path / "eval.jsonl"
  eval_path.write_text(json.dumps({"conversations": [
      {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
      {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Who is Ada?"},
      {"from": "gpt", "value": "A grower."}]}) + "\n")
  config.data.update(dict(source="files", train_files=str(eval_path),
                          eval_files=str(eval_path)))
  [item] = sft_stage.held_out_prompts(config)
  assert item.reference == "A grower." and item.answer is None
  assert [t.role for t in item.context] == ["system", "user", "assistant", "user"]
  check = verifiers.get_answer_checker(config.data.answer_checker)
  assert sft_stage.score_replies([" A  grower. "], [True], [item], check) == {
      "eval/exact_match": 1.0, "eval/stop_rate": 1.0}
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "What is 6 times 7?", "answer": "42"}) + "\n")
  config.eval.prompt_files = str(prompts)
  [item] = sft_stage.held_out_prompts(config)
  assert item == sft_stage.HeldOut((Turn("user", "What is 6 times 7?"),), "42", None)
  assert sft_stage.score_replies(["It is 42."], [False], [item], check) == {
      "eval/answer_accuracy": 1.0, "eval/stop_rate": 0.0}


def test_evaluate_checkpoint_with_the_real_sampler(base_run, sft_run):
  """Any run's checkpoint scored the way the SFT run scores itself."""
  config = small_config(base_run[0])
  metrics = sft_stage.evaluate_checkpoint(config, sft_run[0])
  final = sft_run[1]
  for key in ("eval/answer_accuracy", "eval/exact_match", "eval/stop_rate"):
    assert metrics[key] == pytest.approx(final[key])  # same params, same greedy replies
  assert get_stage("sft").make_evaluator is sft_stage.GenerationEvaluator

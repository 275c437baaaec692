"""Task evaluation: multiple choice, generation and perplexity scores of a tiny random model
equal those computed here independently, one unpadded sequence at a time, without jit."""

import json
import math

import jax
import numpy as np
import pytest

from configs import pretrain
from configs.run_layout import write_run_config
from data.eval_tasks import (MultipleChoice, parse_task, read_tasks, tiny_world_multiple_choice,
                             write_tiny_world_tasks)
from data.records import InvalidRecord
from data.tokenizer import load_tokenizer, train_sentencepiece
from models.build import build_model_spec
from training.checkpoint import Checkpointer
from training.runs import load_model
from training.task_eval import TaskScorer, continuation_tokens, evaluate_tasks

TEXTS = ["The salt of Ashford is sold in Brackwater.", "Copper bars cost nine coins each.",
         "Who is the mayor of Dunmere? Ada is.", "The market is on Monday in Elmstead."] * 20
ITEMS = [("Where does salt come from?", ["Ashford", "Brackwater", "the coast"]),
         ("What do copper bars cost?", ["nine coins", "two coins each", "a lot"]),
         ("Who is the mayor?", ["Ada", "Bran", "nobody at all"]),
         ("", ["Monday", "Tuesday"])]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train_sentencepiece(TEXTS, f"{workdir}/tokenizer/spm", vocab_size=340)
  config = pretrain.get_config("tiny")
  config.model.update(dict(vocab_size=340, d_model=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, mlp_dim=48, max_length=128))
  config.mesh.update(dict(data=-1, fsdp=1))  # 8 CPU devices (tests/conftest.py)
  spec = build_model_spec(config.model)
  params = jax.jit(spec.init)(jax.random.PRNGKey(7))
  with Checkpointer(f"{workdir}/checkpoints", async_save=False) as ckpt:
    ckpt.save(1, {"params": params}, force=True)
  write_run_config(workdir, config, "decoder")
  return workdir, spec, jax.device_get(params), load_tokenizer(f"{workdir}/tokenizer/spm.model")


def reference_logps(spec, params, tokens):
  """log p(tokens[t + 1] | tokens[:t + 1]) for every t, one sequence, no jit, no padding."""
  tokens = np.asarray(tokens, np.int32)[None]
  logits = spec.bind(params)(tokens, positions=np.arange(tokens.shape[1])[None],
                             segment_ids=np.ones_like(tokens))
  logps = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
  return np.array([logps[t, tokens[0, t + 1]] for t in range(tokens.shape[1] - 1)])


def test_continuation_tokens_split_the_whole_text_after_the_context(run):
  _, _, _, tok = run
  context, cont = continuation_tokens(tok, "Who is the mayor?", " Ada")
  assert context == [tok.bos_id] + tok.encode("Who is the mayor?")
  assert context[1:] + cont == tok.encode("Who is the mayor? Ada")


def test_scores_equal_an_independent_computation(run, tmp_path):
  workdir, spec, params, tok = run
  lls = []
  for context, choices in ITEMS:
    row = []
    for choice in choices:
      ctx = [tok.bos_id] + (tok.encode(context) if context else [])
      whole = tok.encode(f"{context} {choice}" if context else choice)
      cont = whole[len(ctx) - 1:]
      row.append(reference_logps(spec, params, ctx + cont)[-len(cont):].sum())
    lls.append(np.array(row))
  # Answers: the likeliest choice for the first two items, another for the last two.
  answers = [int(np.argmax(lls[0])), int(np.argmax(lls[1])), int(np.argmin(lls[2])),
             int(np.argmin(lls[3]))]
  lengths = [np.array([len(" " + c) for c in choices]) for _, choices in ITEMS]
  want_norm = np.mean([int(np.argmax(ll / n)) == a for ll, n, a in zip(lls, lengths, answers)])
  texts = ["Copper bars cost nine coins.", "Ada is the mayor of Dunmere."]
  text_ll = [reference_logps(spec, params, [tok.bos_id] + tok.encode(t)).sum() for t in texts]
  text_tokens = sum(len(tok.encode(t)) for t in texts)

  # Greedy replies by full forward passes, no cache: the first one is the right answer.
  prompts = ["Where does salt come from?", "Who is the mayor?"]
  replies = []
  for prompt in prompts:
    ids = [tok.bos_id] + tok.encode(prompt)
    new = []
    for _ in range(5):
      logits = spec.bind(params)(np.asarray([ids + new], np.int32),
                                 positions=np.arange(len(ids + new))[None],
                                 segment_ids=np.ones((1, len(ids + new)), np.int32))
      new.append(int(np.argmax(logits[0, -1])))
      if new[-1] == tok.eos_id:
        new.pop()
        break
    replies.append(tok.decode(new))

  mc = tmp_path / "mc.jsonl"
  mc.write_text("".join(json.dumps({"type": "multiple_choice", "context": c, "choices": ch,
                                    "answer": a}) + "\n" for (c, ch), a in zip(ITEMS, answers)))
  gen = tmp_path / "qa.jsonl"
  gen.write_text("".join(json.dumps({"type": "generation", "prompt": p, "answer": a,
                                     "checker": "exact"}) + "\n"
                         for p, a in zip(prompts, [replies[0] or "-", "not this"])))
  txt = tmp_path / "heldout.txt"
  txt.write_text("\n".join(texts) + "\n")
  results = evaluate_tasks(workdir, [str(mc), str(gen), str(txt)], batch_size=8,
                           max_new_tokens=5)
  assert results["tasks/mc/multiple_choice/acc"] == 0.5
  assert results["tasks/mc/multiple_choice/acc_norm"] == want_norm
  assert results["tasks/qa/generation/accuracy"] == (0.5 if replies[0].strip() else 0.0)
  np.testing.assert_allclose(results["tasks/heldout/perplexity/perplexity"],
                             math.exp(-sum(text_ll) / text_tokens), rtol=1e-4)
  assert json.loads(open(f"{workdir}/task_eval.json").read()) == results

  scorer = TaskScorer(load_model(workdir), tok, batch_size=8, max_new_tokens=5)
  pairs = [continuation_tokens(tok, c, " " + ch) for c, chs in ITEMS for ch in chs]
  np.testing.assert_allclose(scorer.log_likelihoods(pairs), np.concatenate(lls), atol=1e-4)
  assert scorer.replies(prompts) == replies


def test_task_records_and_the_tiny_world_tasks(tmp_path):
  with pytest.raises(InvalidRecord, match="index of the correct choice"):
    parse_task({"type": "multiple_choice", "choices": ["a", "b"], "answer": 2})
  with pytest.raises(InvalidRecord, match="'type' must be one of"):
    parse_task({"type": "cloze", "text": "x"})
  items = tiny_world_multiple_choice(20)
  assert len(items) == 20 and items == tiny_world_multiple_choice(20)
  for item in items:
    assert len(set(item.choices)) == 4
  assert {i.answer for i in items} == {0, 1, 2, 3}
  path = tmp_path / "tiny.jsonl"
  write_tiny_world_tasks(str(path), num=5)
  read = read_tasks(str(path))
  assert read[:5] == tiny_world_multiple_choice(5) and isinstance(read[0], MultipleChoice)
  assert [r.checker for r in read[5:]] == ["tiny_world"] * 5

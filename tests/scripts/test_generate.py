"""scripts/generate and scripts/chat on a fake run dir (untrained tiny model, real checkpoint)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import models  # noqa: F401
from configs.pretrain import get_config
from data import tiny_world
from data.chat_template import render_prompt
from data.conversation import Turn
from data.records import RecordError
from data.tokenizer import Tokenizer, train_sentencepiece
from models.build import build_model_spec
from models.sampler import generate
from scripts import generate as generate_script
from scripts.chat import ChatSession, chat
from scripts.generate import Generated, completion_text, generate_file, load_decoder
from configs.run_layout import checkpoint_dir
from training.checkpoint import Checkpointer

MAX_NEW = 12
PROMPTS = [{"prompt": "The river town"}, {"prompt": "Mara sells", "answer": "salt"},
           {"prompt": "In spring the caravan"}, {"prompt": "Copper"}, {"prompt": "A ledger"}]


def make_run_dir(workdir, **model):
  """config.json + tokenizer/spm.model + a step-3 checkpoint of random params."""
  workdir = str(workdir)
  tok_path = train_sentencepiece(tiny_world.generate_documents("train", 300),
                                 os.path.join(workdir, "tokenizer", "spm"), 384)
  config = get_config("tiny")
  config.model.update(dict(dict(vocab_size=384, d_model=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, mlp_dim=64, max_length=64), **model))
  config.data.tokenizer_vocab_size = 384
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f)
  params = build_model_spec(config.model).init(jax.random.PRNGKey(0))
  with Checkpointer(checkpoint_dir(workdir), async_save=False) as ckpt:
    ckpt.save(3, {"params": params, "step": np.int32(3)}, force=True)
  assert Tokenizer.load(tok_path).vocab_size == 384
  return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(run_dir):
  return load_decoder(run_dir)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
  return str(path)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_generate_file_writes_greedy_completions(model, prompts_file, tmp_path):
  out = str(tmp_path / "out.jsonl")
  # batch_size 2: three batches, the last filled up with a copy and trimmed back.
  assert generate_file(model, prompts_file, out, max_new_tokens=MAX_NEW,
                       batch_size=2) == Generated(count=5, truncated=0)
  lines = read_jsonl(out)
  assert [line["prompt"] for line in lines] == [p["prompt"] for p in PROMPTS]
  assert [line.get("answer") for line in lines] == [None, "salt", None, None, None]
  tok = model.tokenizer
  ids = [tok.encode(p["prompt"], add_bos=True) for p in PROMPTS]
  direct = generate(model.spec, model.params, ids, max_new_tokens=MAX_NEW, eos_id=tok.eos_id,
                    stop_ids=[tok.eos_id])
  for i, line in enumerate(lines):
    assert set(line) >= {"prompt", "completion", "tokens", "logprob"}
    n = int(direct.lengths[i])
    assert line["tokens"] == direct.tokens[i, :n].tolist()
    stripped = line["tokens"][:-1] if line["tokens"][-1] == tok.eos_id else line["tokens"]
    assert line["completion"] == tok.decode(stripped)
    np.testing.assert_allclose(line["logprob"], direct.log_probs[i].sum(), rtol=1e-5)
    assert line["logprob"] < 0
  again = str(tmp_path / "again.jsonl")
  generate_file(model, prompts_file, again, max_new_tokens=MAX_NEW, batch_size=2)
  assert read_jsonl(again) == lines


def test_cli_matches_function(run_dir, model, prompts_file, tmp_path):
  out_fn, out_cli = str(tmp_path / "fn.jsonl"), str(tmp_path / "cli.jsonl")
  generate_file(model, prompts_file, out_fn, max_new_tokens=MAX_NEW, batch_size=4,
                temperature=0.8, top_p=0.9, seed=5)
  cmd = [sys.executable, "-m", "scripts.generate", f"--workdir={run_dir}",
         f"--prompts={prompts_file}", f"--output={out_cli}", f"--max_new_tokens={MAX_NEW}",
         "--batch_size=4", "--temperature=0.8", "--top_p=0.9", "--seed=5"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Wrote 5 completions" in result.stdout
  assert read_jsonl(out_cli) == read_jsonl(out_fn)


def test_chat_template_prompts_and_bad_lines(model, tmp_path):
  path = tmp_path / "turns.jsonl"
  turns = [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Who sells salt?"}]
  path.write_text(json.dumps({"prompt": turns}) + "\n")
  out = str(tmp_path / "out.jsonl")
  generate_file(model, str(path), out, max_new_tokens=MAX_NEW, chat_template="chatml",
                batch_size=1)
  tok = model.tokenizer
  context = (Turn("system", "Be brief."), Turn("user", "Who sells salt?"))
  direct = generate(model.spec, model.params, [render_prompt(tok, context, "chatml")],
                    max_new_tokens=MAX_NEW, eos_id=tok.eos_id,
                    stop_ids=[tok.token_to_id("<|im_end|>")])
  assert read_jsonl(out)[0]["tokens"] == direct.tokens[0, :direct.lengths[0]].tolist()
  with pytest.raises(RecordError, match=r"turns\.jsonl:1: .*needs --chat_template"):
    generate_file(model, str(path), out, chat_template="none")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
  with pytest.raises(RecordError, match=r"bad\.jsonl:2: missing field 'prompt'"):
    generate_file(model, str(bad), out)


@pytest.mark.parametrize("setting, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(top_k=-1), "top_k must be >= 0, got -1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
])
def test_bad_settings_fail_before_the_output_is_touched(model, prompts_file, tmp_path, setting,
                                                        message):
  out = tmp_path / "out.jsonl"
  out.write_text("earlier run\n")
  with pytest.raises(ValueError, match=message):
    generate_file(model, prompts_file, str(out), **setting)
  assert out.read_text() == "earlier run\n"


def test_a_failure_midway_keeps_the_earlier_output(model, tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("earlier run\n")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
  with pytest.raises(RecordError):
    generate_file(model, str(bad), str(out))
  assert out.read_text() == "earlier run\n"
  assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "out.jsonl"]  # no temporary file left


def test_cli_rejects_bad_settings_in_one_line(run_dir, prompts_file, tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("earlier run\n")
  cmd = [sys.executable, "-m", "scripts.generate", f"--workdir={run_dir}",
         f"--prompts={prompts_file}", f"--output={out}", "--max_new_tokens=0", "--top_p=0"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: max_new_tokens must be >= 1, got 0; top_p must be in (0, 1], got 0.0")
  assert out.read_text() == "earlier run\n"


def test_learned_positions_cut_long_prompts_keeping_the_end(tmp_path, monkeypatch):
  model = load_decoder(make_run_dir(tmp_path / "run", position="learned", max_length=32))
  warnings = []
  monkeypatch.setattr(generate_script.logging, "warning",
                      lambda message, *args: warnings.append(message % args))
  long_prompt = " ".join(["The river town trades salt for copper every spring."] * 4)
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Copper", long_prompt]))
  out = str(tmp_path / "out.jsonl")
  # 32 positions - 8 new tokens leave 24 for the prompt.
  done = generate_file(model, str(path), out, max_new_tokens=8, batch_size=2)
  assert done == Generated(count=2, truncated=1)
  assert len(warnings) == 1 and f"{path}: prompt 2 has " in warnings[0]
  tok = model.tokenizer
  ids = tok.encode(long_prompt, add_bos=True)
  kept = ids[:1] + ids[len(ids) - 23:]  # BOS and the last 23 tokens
  direct = generate(model.spec, model.params, [kept], max_new_tokens=8, eos_id=tok.eos_id,
                    stop_ids=[tok.eos_id])
  assert read_jsonl(out)[1]["tokens"] == direct.tokens[0, :direct.lengths[0]].tolist()
  with pytest.raises(ValueError, match="max_new_tokens 31 leaves no room for a prompt"):
    generate_file(model, str(path), out, max_new_tokens=31)


def test_chat_keeps_the_conversation(model):
  session = ChatSession(model, template="default", system="Be brief.", max_new_tokens=8)
  replies = list(chat(session, ["Who sells salt?", "And copper?"]))
  assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
  assert [t.role for t in session.turns] == ["system", "user", "assistant", "user", "assistant"]
  assert session.turns[2].content == replies[0]
  # The second reply continues the rendered conversation, first reply included.
  tok = model.tokenizer
  context = tuple(session.turns[:4])
  direct = generate(model.spec, model.params, [render_prompt(tok, context, "default")],
                    max_new_tokens=8, eos_id=tok.eos_id, stop_ids=session.stops)
  expected = direct.tokens[0, :direct.lengths[0]].tolist()
  assert replies[1] == completion_text(tok, expected, session.stops)
  fresh = ChatSession(model, template="default", system="Be brief.", max_new_tokens=8)
  assert list(chat(fresh, ["Who sells salt?", "/reset", "Who sells salt?"])) == replies[:1] * 2


def test_chat_drops_oldest_exchanges_beyond_the_context(model):
  # max_length 64 - 24 new tokens leaves 40 prompt tokens: the long first exchange must go.
  session = ChatSession(model, template="default", system="Be brief.", max_new_tokens=24)
  long_reply = "The river town trades salt for copper every spring, and the ferry waits."
  session.turns += [Turn("user", "Tell me."), Turn("assistant", long_reply)]
  both = session.turns + [Turn("user", "Who sells salt?")]
  assert len(render_prompt(model.tokenizer, tuple(both), "default")) > 40
  session.reply("Who sells salt?")
  assert [t.content for t in session.turns[:2]] == ["Be brief.", "Who sells salt?"]
  assert [t.role for t in session.turns] == ["system", "user", "assistant"]


@pytest.mark.parametrize("script", ["scripts.generate", "scripts.chat"])
def test_help(script):
  result = subprocess.run([sys.executable, "-m", script, "--help"], capture_output=True,
                          text=True, timeout=120)
  # absl's --help exits with status 1 after printing the usage (as every script here does).
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr
  assert "--workdir:" in result.stdout and "--max_new_tokens:" in result.stdout


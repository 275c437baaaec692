"""scripts/synthesize: record selection by hand, and end to end on a fake run (random weights)."""

import json
import os
import subprocess
import sys

import jax
import pytest

import models  # noqa: F401
from configs import sft as sft_config
from data import tiny_tasks, tiny_world
from data.conversation import Turn, parse_preferences, parse_sft
from data.tokenizer import train_sentencepiece
from models.build import build_model_spec
from scripts.generate import load_decoder
from scripts.synthesize import select_records, synthesize
from configs.run_layout import checkpoint_dir
from training.checkpoint import Checkpointer

USER = (Turn("user", "Where does Tom live?"),)


def test_sft_selection_threshold_keep_and_dedupe():
  replies = ["Tom lives in Elmstead.", "Tom lives in Dunmere.", "Tom lives in Elmstead.",
             "He lives in Elmstead."]
  scores = [1.0, 0.0, 1.0, 0.5]
  got = select_records("Where does Tom live?", USER, replies, scores, mode="sft", keep=5,
                       threshold=0.5)
  # Best first, the duplicate dropped, the 0-score reply below the threshold.
  assert got == [{"instruction": "Where does Tom live?", "output": "Tom lives in Elmstead."},
                 {"instruction": "Where does Tom live?", "output": "He lives in Elmstead."}]
  assert len(select_records("q", USER, replies, scores, mode="sft", keep=1)) == 1
  assert select_records("q", USER, replies, [0.0] * 4, mode="sft") == []
  sharegpt = select_records("Where does Tom live?", (Turn("system", "Be brief."),) + USER,
                            replies[:1], [1.0], mode="sft", record_format="sharegpt")
  assert sharegpt == [{"conversations": [{"from": "system", "value": "Be brief."},
                                         {"from": "human", "value": "Where does Tom live?"},
                                         {"from": "gpt", "value": "Tom lives in Elmstead."}]}]
  assert parse_sft(sharegpt[0])[-1].content == "Tom lives in Elmstead."
  with pytest.raises(ValueError, match="sharegpt"):
    select_records("q", (Turn("system", "s"),) + USER, replies, scores, mode="sft")


def test_preference_selection_best_against_worst():
  replies = ["Tom lives in Dunmere.", "Tom lives in Elmstead.", "I do not know."]
  got = select_records("Where does Tom live?", USER, replies, [0.0, 1.0, -1.0],
                       mode="preferences")
  assert got == [{"prompt": "Where does Tom live?", "chosen": "Tom lives in Elmstead.",
                  "rejected": "I do not know."}]
  (pair,) = parse_preferences(got[0])
  assert pair.chosen == "Tom lives in Elmstead." and pair.rejected == "I do not know."
  assert select_records("q", USER, replies, [1.0, 1.0, 1.0], mode="preferences") == []
  assert select_records("q", USER, replies, [0.0, 1.0, 0.5], mode="preferences",
                        min_margin=1.0) == []


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
  """A fake SFT run and reward-model run (random weights) and a prompts file."""
  root = tmp_path_factory.mktemp("runs")
  config = sft_config.get_config("tiny")
  config.model.update(dict(vocab_size=384, d_model=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, mlp_dim=64))
  config.data.tokenizer = ""
  runs = {}
  for name, kind, objective in (("sft", "decoder", "sft"), ("reward", "reward", "reward")):
    workdir = str(root / name)
    train_sentencepiece(tiny_world.generate_documents("train", 300),
                        os.path.join(workdir, "tokenizer", "spm"), 384)
    config.objective.name = objective
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config.to_dict(), f)
    params = build_model_spec(config.model, kind).init(jax.random.PRNGKey(len(runs)))
    with Checkpointer(checkpoint_dir(workdir), async_save=False) as ckpt:
      ckpt.save(1, {"params": params}, force=True)
    runs[name] = workdir
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n"
                             for r in tiny_tasks.prompt_records("validation", 4)))
  return runs, str(prompts)


def test_synthesize_end_to_end(run_dirs, tmp_path):
  runs, prompts = run_dirs
  model = load_decoder(runs["sft"])
  kw = dict(samples=2, max_new_tokens=6, batch_size=4, seed=3)
  sft_out = str(tmp_path / "sft.jsonl")
  # Random weights never answer right; a threshold below every score keeps each prompt's best.
  summary = synthesize(model, prompts, sft_out, mode="sft", threshold=-10.0, **kw)
  assert summary["prompts"] == 4 and summary["samples"] == 8
  assert summary["pass_rate"] == 1.0 and -1.0 <= summary["mean_score"] <= 1.0
  lines = [json.loads(l) for l in open(sft_out, encoding="utf-8")]
  assert len(lines) == summary["records"] and 1 <= len(lines) <= 4
  for line in lines:
    assert parse_sft(line)[-1].role == "assistant"
  # Deterministic for a seed.
  again = str(tmp_path / "again.jsonl")
  synthesize(model, prompts, again, mode="sft", threshold=-10.0, **kw)
  assert open(again).read() == open(sft_out).read()
  # Reward model + function: distinct replies get distinct scores, so every prompt whose two
  # replies differ gives a pair.
  pairs_out = str(tmp_path / "pairs.jsonl")
  summary = synthesize(model, prompts, pairs_out, mode="preferences",
                       reward_model=runs["reward"], **kw)
  pairs = [json.loads(l) for l in open(pairs_out, encoding="utf-8")]
  assert len(pairs) == summary["records"] >= 1
  for pair in pairs:
    parse_preferences(pair)
    assert pair["chosen"] != pair["rejected"]


def test_cli_help():
  result = subprocess.run([sys.executable, "-m", "scripts.synthesize", "--help"],
                          capture_output=True, text=True, timeout=120)
  # absl's --help exits with status 1 after printing the usage (as every script here does).
  assert result.returncode in (0, 1) and "Traceback" not in result.stderr
  assert "--mode:" in result.stdout and "--threshold:" in result.stdout

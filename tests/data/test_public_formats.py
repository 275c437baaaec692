"""The paper recipes' data, read from small files in the published formats: GSM8K Parquet,
Anthropic HH JSONL, Alpaca's JSON array; a tfds `huggingface:` name passes through."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.papers import dpo_hh, grpo_gsm8k, sft_alpaca
from data import sources, tfds_builder
from data.conversation import PreferencePair, Turn
from data.dialogue_text import split_dialogue
from data.records import RecordError
from data.verifiers import get_answer_checker

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips in May. How many clips did Natalia sell altogether?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
               "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                 "babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she "
               "earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]
HH = [
    {"chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not "
               "list those.",
     "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here is a list."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a fact."
               "\n\nAssistant: Honey never spoils.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a fact."
                 "\n\nAssistant: No."},
    {"chosen": "\n\nHuman: Why?\n\nAssistant: ", "rejected": "\n\nHuman: Why?\n\nAssistant: No."},
]
ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise.\n3. Sleep well."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
]


def data_config(module, **files):
  config = module.get_config("tiny")
  config.data.update(files)
  return config.data


def test_gsm8k_parquet_gives_prompts_the_math_checker_scores(tmp_path):
  path = tmp_path / "train-00000-of-00001.parquet"
  pq.write_table(pa.Table.from_pylist(GSM8K), path)
  cfg = data_config(grpo_gsm8k, train_files=str(tmp_path / "train-*.parquet"))
  prompts = sources.load_records(cfg, "prompts", "train", str(tmp_path))
  assert [p.context for p in prompts] == [(Turn("user", r["question"]),) for r in GSM8K]
  assert prompts[0].answer == GSM8K[0]["answer"]
  check = get_answer_checker(cfg.answer_checker)
  assert check("She sold 24 in May, so \\boxed{72} in all.", prompts[0].answer)
  assert check("She earned $10.00.", prompts[1].answer)
  assert not check("She earned $0.2 per minute.", prompts[1].answer)


def test_hh_dialogues_become_pairs_with_the_shared_turns_as_prompt(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in HH))
  cfg = data_config(dpo_hh, train_files=str(path))
  pairs = sources.load_records(cfg, "preferences", "train", str(tmp_path))
  assert pairs == [
      PreferencePair((Turn("user", "What are some cuss words in english?"),),
                     "I'd rather not list those.", "Here is a list."),
      PreferencePair((Turn("user", "Hi"), Turn("assistant", "Hello! How can I help?"),
                      Turn("user", "Tell me a fact.")), "Honey never spoils.", "No.")]
  cfg.skip_invalid = False  # the third record's chosen reply is empty
  with pytest.raises(RecordError, match=r"train.jsonl:3: the chosen or the rejected reply"):
    sources.load_records(cfg, "preferences", "train", str(tmp_path))


def test_hh_turns_of_one_speaker_merge_and_text_before_a_turn_is_an_error():
  assert split_dialogue("\n\nHuman: a\n\nHuman: b\n\nAssistant: c") == [
      ("user", "a\n\nb"), ("assistant", "c")]
  with pytest.raises(ValueError, match="expected a dialogue"):
    split_dialogue("preamble\n\nHuman: a")


def test_alpaca_json_array_as_published(tmp_path):
  path = tmp_path / "train.json"
  path.write_text(json.dumps(ALPACA, indent=4))
  cfg = data_config(sft_alpaca, train_files=str(path))
  conversations = sources.load_records(cfg, "conversations", "train", str(tmp_path))
  assert conversations[1] == (Turn("user", "Translate to French.\n\nGood morning"),
                              Turn("assistant", "Bonjour"))
  assert conversations[0][0].content == ALPACA[0]["instruction"]
  path.write_text(json.dumps({"instruction": "x"}))
  with pytest.raises(RecordError, match="must hold a JSON array"):
    sources.load_records(cfg, "conversations", "train", str(tmp_path))


def test_tfds_huggingface_name_passes_through(monkeypatch):
  seen = {}

  def fake_data_source(name, split, data_dir):
    seen.update(name=name, split=split)
    return [{"question": GSM8K[0]["question"].encode(), "answer": GSM8K[0]["answer"].encode()}]
  monkeypatch.setattr(tfds_builder.tfds, "data_source", fake_data_source)
  cfg = data_config(grpo_gsm8k, source="tfds", tfds_name="huggingface:gsm8k/main",
                    train_split="train")
  prompts = sources.load_records(cfg, "prompts", "train")
  assert seen == {"name": "huggingface:gsm8k/main", "split": "train"}
  assert prompts[0].answer.endswith("#### 72")

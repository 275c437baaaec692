"""SFT data: loss masks token by token, truncation and drops, packing, record errors, resume."""

import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import sft as sft_config
from data import chat_template
from data import records
from data import sft
from data import tiny_tasks
from data.conversation import Turn


def _data_config(**overrides):
  cfg = sft_config.get_config("tiny").data
  cfg.tokenizer = ""
  cfg.update(dict(tiny_task_train_records=60, tiny_task_eval_records=20, seq_len=64,
                  pack_bins=4))
  cfg.update(overrides)
  return cfg


def _sym(tok, piece):
  return tok.token_to_id(piece)


QA = (Turn("user", "Who is the mayor of Ashford?"), Turn("assistant", "The mayor is Ada."))
MULTI = (Turn("system", "Answer briefly."), Turn("user", "Where does Zoe live?"),
         Turn("assistant", "Zoe lives in Oakhurst."), Turn("user", "What does Zoe make?"),
         Turn("assistant", "Zoe makes fish."))


def _expected_default(tok, conversation, supervise):
  """[BOS] then per turn <|role|> text <|end_of_turn|>; assistant text + closing supervised."""
  last = max(i for i, t in enumerate(conversation) if t.role == "assistant")
  tokens, mask = [tok.bos_id], [0]
  for i, turn in enumerate(conversation):
    body = tok.encode(turn.content) + [_sym(tok, "<|end_of_turn|>")]
    on = turn.role == "assistant" and (supervise == "all" or i == last)
    tokens += [_sym(tok, f"<|{turn.role}|>")] + body
    mask += [0] + [int(on)] * len(body)
  return tokens, mask


@pytest.mark.parametrize("conversation", [QA, MULTI], ids=["single_turn", "multi_turn"])
@pytest.mark.parametrize("supervise", ["all", "last"])
def test_mask_token_by_token_default_template(tiny_tokenizer, conversation, supervise):
  tok = tiny_tokenizer
  tokens, mask, ends = sft.render_turns(tok, conversation, "default", supervise)
  want_tokens, want_mask = _expected_default(tok, conversation, supervise)
  assert tokens.tolist() == want_tokens
  assert mask.tolist() == want_mask
  assert ends[-1] == len(tokens)
  whole = chat_template.render(tok, conversation, "default", supervise=supervise)
  np.testing.assert_array_equal(whole.tokens, tokens)
  np.testing.assert_array_equal(whole.loss_mask, mask)
  # The unit predicts token i+1 from token i: its mask is that of the predicted token.
  [[segment]] = sft.sft_units((tokens, mask), seq_len=len(tokens) - 1)
  np.testing.assert_array_equal(segment["inputs"], tokens[:-1])
  np.testing.assert_array_equal(segment["targets"], tokens[1:])
  np.testing.assert_array_equal(segment["loss_mask"], mask[1:])
  # Supervised targets are exactly the assistant replies and their end-of-turn tokens.
  replies = [t for i, t in enumerate(conversation) if t.role == "assistant" and
             (supervise == "all" or i == len(conversation) - 1)]
  want = sum((tok.encode(t.content) + [_sym(tok, "<|end_of_turn|>")] for t in replies), [])
  assert segment["targets"][segment["loss_mask"] > 0].tolist() == want


def test_mask_token_by_token_chatml(tiny_tokenizer):
  tok = tiny_tokenizer
  tokens, mask, _ = sft.render_turns(tok, QA, "chatml", "all")
  start, end, newline = _sym(tok, "<|im_start|>"), _sym(tok, "<|im_end|>"), tok.encode("\n")
  user = [start] + tok.encode("user\n") + tok.encode(QA[0].content) + [end] + newline
  header = [start] + tok.encode("assistant\n")
  reply = tok.encode(QA[1].content) + [end]
  assert tokens.tolist() == [tok.bos_id] + user + header + reply + newline
  assert mask.tolist() == [0] * (1 + len(user) + len(header)) + [1] * len(reply) + [0] * len(
      newline)


def _lengths(tok, conversation):
  return sft.render_turns(tok, conversation, "default", "all")[2]


def test_truncation_keeps_leading_whole_turns(tiny_tokenizer):
  tok = tiny_tokenizer
  tokens, mask, ends = sft.render_turns(tok, MULTI, "default", "all")
  first_qa_end = ends[2]  # system, user, assistant
  seq_len = first_qa_end + 3 - 1  # room for the first exchange and part of the next
  outcome, kept, kept_mask = sft.truncate(tokens, mask, ends, seq_len)
  assert outcome == "turns"
  np.testing.assert_array_equal(kept, tokens[:first_qa_end])
  np.testing.assert_array_equal(kept_mask, mask[:first_qa_end])
  assert kept[-1] == _sym(tok, "<|end_of_turn|>") and kept_mask[-1] == 1
  # One token more than the whole conversation needs: kept whole.
  assert sft.truncate(tokens, mask, ends, len(tokens) - 1)[0] == "whole"


def test_truncation_cuts_the_first_reply_keeping_the_prompt(tiny_tokenizer):
  tok = tiny_tokenizer
  tokens, mask, ends = sft.render_turns(tok, QA, "default", "all")
  prompt_len = ends[0] + 1  # BOS, user turn, assistant header
  seq_len = prompt_len + 2  # the prompt and 3 reply tokens (L + 1 tokens)
  outcome, kept, kept_mask = sft.truncate(tokens, mask, ends, seq_len)
  assert outcome == "reply"
  np.testing.assert_array_equal(kept, tokens[:seq_len + 1])
  assert kept_mask.tolist() == [0] * prompt_len + [1, 1, 1]
  [[segment]] = sft.sft_units((kept, kept_mask), seq_len)
  assert segment["targets"][segment["loss_mask"] > 0].tolist() == tok.encode(QA[1].content)[:3]


def test_truncation_drops_when_nothing_supervised_fits(tiny_tokenizer):
  tok = tiny_tokenizer
  tokens, mask, ends = sft.render_turns(tok, QA, "default", "all")
  prompt_len = ends[0] + 1
  # Exactly the prompt fits: the first reply token would be the (L+1)-th token's successor.
  assert sft.truncate(tokens, mask, ends, prompt_len - 1)[0] == "dropped"
  assert sft.truncate(tokens, mask, ends, prompt_len)[0] == "reply"
  # supervise='last': the final turn lies beyond the row, the earlier reply is not supervised.
  tokens, mask, ends = sft.render_turns(tok, MULTI, "default", "last")
  assert sft.truncate(tokens, mask, ends, ends[3])[0] == "dropped"


def test_dropped_conversations_are_counted_and_logged(tiny_tokenizer, caplog, tmp_path):
  long_prompt = (Turn("user", "Tell me about the towns. " * 20), Turn("assistant", "No."))
  stats = sft.SftStats()
  examples = sft.render_examples(tiny_tokenizer, [QA, long_prompt, MULTI, long_prompt],
                                 template="default", supervise="all", seq_len=40, stats=stats)
  assert (stats.conversations, stats.dropped, stats.examples) == (4, 2, 2)
  assert len(examples) == 2
  assert stats.supervised_tokens == sum(int(m[1:].sum()) for _, m in examples)
  # Through the cached loader: the drop is logged with its count.
  cfg = _data_config(source="files", seq_len=40)
  path = _write_jsonl(tmp_path, "sft.jsonl", [
      {"instruction": QA[0].content, "output": QA[1].content},
      {"instruction": long_prompt[0].content, "output": "No."}])
  cfg.train_files = path
  with caplog.at_level(logging.WARNING):
    examples, stats = sft.load_examples(cfg, tiny_tokenizer, "train", str(tmp_path))
  assert (stats.dropped, stats.examples) == (1, 1)
  assert any("1 conversations dropped" in r.getMessage() for r in caplog.records)


def _write_jsonl(directory, name, rows):
  path = directory / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_packing_segments_positions_and_masks(tiny_tokenizer):
  cfg = _data_config(seq_len=64, shuffle=False)
  examples, stats = sft.load_examples(cfg, tiny_tokenizer, "eval")
  batches = list(sft.make_sft_dataset(cfg, tiny_tokenizer, split="eval", batch_size=4))
  # One pass over the eval split: every supervised target exactly once.
  assert sum(b["loss_mask"].sum() for b in batches) == stats.supervised_tokens
  rows = [{k: b[k][i] for k in b} for b in batches for i in range(len(b["inputs"]))]
  segments = []
  for row in rows:
    for s in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == s
      assert row["positions"][where].tolist() == list(range(where.sum()))
      segments.append((row["inputs"][where], row["targets"][where], row["loss_mask"][where]))
    assert not row["loss_mask"][row["segment_ids"] == 0].any()
  assert len(segments) == len(examples) == stats.examples
  want = {tuple(t.tolist()): m[1:].tolist() for t, m in examples}
  for inputs, targets, mask in segments:
    tokens = tuple(inputs.tolist()) + (int(targets[-1]),)
    assert want[tokens] == mask.tolist()
  assert max(len(t) for t, _ in examples) <= cfg.seq_len + 1


def test_record_errors_name_file_and_line(tiny_tokenizer, tmp_path):
  good = {"instruction": "Who is the mayor of Ashford?", "output": "Ada."}
  path = _write_jsonl(tmp_path, "bad.jsonl", [
      good, {"instruction": "No output"}, {"conversations": []}, "{not json",
      {"conversations": [{"from": "human", "value": 7}]}, {"instruction": 3, "output": "x"}])
  cfg = _data_config(source="files", train_files=path)
  with pytest.raises(records.RecordError, match=r"bad\.jsonl:2: missing field 'output'"):
    sft.load_conversations(cfg, "train")
  cfg.skip_invalid = True
  counter = records.SkipCounter()
  assert len(sft.load_conversations(cfg, "train", counter=counter)) == 1
  assert counter.skipped == 5
  assert dict(counter.reasons) == {"missing_field": 1, "empty": 1, "bad_json": 1,
                                   "wrong_type": 2}
  _, stats = sft.load_examples(cfg, tiny_tokenizer, "train", str(tmp_path))
  assert (stats.invalid, stats.examples) == (5, 1)
  # A record of the other format is an error when the format is fixed.
  path = _write_jsonl(tmp_path, "mixed.jsonl", [good, {"conversations": [
      {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}])
  with pytest.raises(records.RecordError, match=r"mixed\.jsonl:2: .*'alpaca'"):
    sft.load_conversations(_data_config(source="files", train_files=path, format="alpaca"),
                           "train")
  with pytest.raises(records.RecordError, match=r"mixed\.jsonl:1: .*'sharegpt'"):
    sft.load_conversations(_data_config(source="files", train_files=path, format="sharegpt"),
                           "train")
  assert len(sft.load_conversations(_data_config(source="files", train_files=path),
                                    "train")) == 2


def test_tiny_tasks_written_and_parsed(tmp_path):
  cfg = _data_config(tiny_task="mixed", tiny_task_train_records=9)
  on_disk = sft.load_conversations(cfg, "train", str(tmp_path))
  assert on_disk == sft.load_conversations(cfg, "train")  # in memory: the same conversations
  assert len(on_disk) == 9
  assert sum(len(c) == 2 for c in on_disk) == 5  # 5 Alpaca, 4 multi-turn ShareGPT
  assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
      "tiny_alpaca-train.jsonl", "tiny_alpaca-validation.jsonl",
      "tiny_sharegpt-train.jsonl", "tiny_sharegpt-validation.jsonl"]
  held_out = {t.content for c in sft.load_conversations(cfg, "eval") for t in c}
  trained = {t.content for c in on_disk for t in c if t.role == "user"}
  assert not held_out & trained


class _SftTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """ShareGPT records as a tfds dataset: `conversations` is a Sequence of {from, value}."""
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None

  def __init__(self, rows, **kwargs):
    self.name = "sft_test_chats"
    self._rows = rows
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
        tfds.features.FeaturesDict({"conversations": tfds.features.Sequence(
            {"from": tfds.features.Text(), "value": tfds.features.Text()})})))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, row in enumerate(self._rows):
      yield i, row


def test_tfds_source_and_its_errors(tmp_path):
  rows = [{"conversations": [{"from": "human", "value": q.text}, {"from": "gpt",
                                                                    "value": q.response}]}
          for q in tiny_tasks.questions("train", 3)]
  rows.insert(1, {"conversations": []})
  _SftTfds(rows, data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = _data_config(source="tfds", tfds_name="sft_test_chats", tfds_data_dir=str(tmp_path))
  with pytest.raises(records.RecordError, match=r"tfds:sft_test_chats/train:2: .*no turns"):
    sft.load_conversations(cfg, "train")
  cfg.skip_invalid = True
  conversations = sft.load_conversations(cfg, "train")
  assert len(conversations) == 3
  q = tiny_tasks.questions("train", 1)[0]
  assert conversations[0] == (Turn("user", q.text), Turn("assistant", q.response))


def test_resume_of_the_sft_iterator(tiny_tokenizer):
  cfg = _data_config(seq_len=48, pack_bins=3)
  make = lambda: iter(sft.make_sft_dataset(cfg, tiny_tokenizer, split="train", batch_size=2,
                                           shard_index=1, shard_count=2, seed=3))
  straight = make()
  for _ in range(5):
    next(straight)
  state = json.loads(json.dumps(straight.get_state()))  # what a checkpoint stores
  want = [next(straight) for _ in range(12)]  # past the end of an epoch (reshuffled)
  resumed = make()
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])


def test_replay_mixes_pretraining_documents_into_training(tiny_tokenizer, tmp_path):
  cfg = _data_config(seq_len=48, pack_bins=3, replay_source="tiny_world",
                     replay_tiny_world_domain="world", replay_weight=0.25,
                     tiny_world_train_docs=50)
  make = lambda: iter(sft.make_sft_dataset(cfg, tiny_tokenizer, split="train", batch_size=4,
                                           seed=1, workdir=str(tmp_path)))
  it = make()
  batches = [next(it) for _ in range(6)]
  assistant = tiny_tokenizer.token_to_id("<|assistant|>")
  chats = replayed = 0
  for batch in batches:
    for row in range(4):
      for s in range(1, batch["segment_ids"][row].max() + 1):
        where = batch["segment_ids"][row] == s
        inputs, mask = batch["inputs"][row][where], batch["loss_mask"][row][where]
        if assistant in inputs:
          chats += 1
          assert 0 < mask.sum() < len(mask)  # prompt unsupervised
        elif inputs[0] == tiny_tokenizer.bos_id:
          replayed += 1
          assert mask.all()  # plain next-token prediction on the whole document
  # One document in four is replayed (documents longer than a row give more segments).
  assert 0.2 < replayed / (chats + replayed) < 0.45
  # The mixed stream resumes exactly.
  it = make()
  for _ in range(3):
    next(it)
  state, want = it.get_state(), [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(resumed)["inputs"], w["inputs"])
  # Eval stays SFT only.
  evals = list(sft.make_sft_dataset(cfg, tiny_tokenizer, split="eval", batch_size=4,
                                    workdir=str(tmp_path)))
  assert all(assistant in b["inputs"][r][b["segment_ids"][r] == 1] for b in evals
             for r in range(4) if b["segment_ids"][r].max())

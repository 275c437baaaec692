"""Hugging Face tokenizer.json tokenizers behind data/tokenizer.py's interface, on byte-level
BPE tokenizers built here (Llama-3 style and Qwen2 style special tokens), checked against
`transformers`' own fast tokenizer on the same files."""

import json
import pickle

import ml_collections
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data import chat_template, tiny_world
from data.conversation import Turn
from data.pipeline import resolve_tokenizer
from data.tokenizer import HFTokenizer, Tokenizer as SpmTokenizer, load_tokenizer

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Older tokenizer_config.json files write special tokens as serialised AddedTokens.
ADDED_EOS = {"__type": "AddedToken", "content": "<|end_of_text|>", "lstrip": False,
             "normalized": False, "rstrip": False, "single_word": False, "special": True}
TEXTS = ["The river town trades salt for copper every spring.",
         "  Spaces, ünïcödé and digits 12345 survive a round trip.\n"]


def build(directory, specials, config):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(tiny_world.generate_documents("train", 200), trainer)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  with open(directory / "tokenizer_config.json", "w") as f:
    json.dump(dict(config, tokenizer_class="PreTrainedTokenizerFast"), f)
  return str(directory)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
  return build(tmp_path_factory.mktemp("llama3"), LLAMA3_SPECIALS, dict(
      bos_token="<|begin_of_text|>", eos_token=ADDED_EOS,
      chat_template=LLAMA3_TEMPLATE))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  return build(tmp_path_factory.mktemp("qwen"), QWEN_SPECIALS, dict(
      bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      chat_template=QWEN_TEMPLATE))


def test_special_ids_and_fallbacks(llama3_dir, qwen_dir):
  llama = load_tokenizer(llama3_dir)
  assert isinstance(llama, HFTokenizer) and llama.vocab_size == 400
  # Specials come first in a trained vocabulary, in the order given.
  assert (llama.bos_id, llama.eos_id, llama.unk_id) == (0, 1, -1)
  assert llama.pad_id == llama.eos_id            # no pad token: EOS pads
  qwen = load_tokenizer(qwen_dir + "/tokenizer.json")
  assert (qwen.pad_id, qwen.eos_id) == (0, 2)
  assert qwen.bos_id == qwen.eos_id              # no BOS token: EOS frames documents
  assert qwen.token_to_id("<|im_start|>") == 1 and qwen.token_to_id("<|nope|>") == -1


def test_encode_decode_match_transformers(llama3_dir):
  ours = load_tokenizer(llama3_dir)
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=llama3_dir + "/tokenizer.json")
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    assert ours.encode(text, add_bos=True, add_eos=True) == [0] + ids + [1]
  assert ours.encode_batch(TEXTS, add_eos=True) == [ours.encode(t, add_eos=True) for t in TEXTS]
  framed = ours.encode("salt<|eot_id|>", add_bos=True, add_eos=True)
  assert framed[-2] == ours.token_to_id("<|eot_id|>")       # specials in text stay one token
  # BOS / EOS / pad decode to nothing; other special tokens keep their text.
  assert ours.decode(framed) == "salt<|eot_id|>"
  assert ours.decode_batch([framed, [0, 1]]) == ["salt<|eot_id|>", ""]


def test_chat_template_renders_like_transformers(llama3_dir):
  ours = load_tokenizer(llama3_dir)
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(llama3_dir)
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is 7 times 6?"}]
  for prompt in (False, True):
    got = ours.apply_chat_template(messages, add_generation_prompt=prompt)
    assert got == theirs.apply_chat_template(messages, add_generation_prompt=prompt,
                                             tokenize=False)
  assert got.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert ours.chat_template == LLAMA3_TEMPLATE


def test_stage_chatml_template_works_with_a_qwen_style_tokenizer(qwen_dir):
  tok = load_tokenizer(qwen_dir)
  rendered = chat_template.render(tok, [Turn("user", "Hi"), Turn("assistant", "Hello.")],
                                  "chatml")
  ids = rendered.tokens.tolist()
  assert ids[0] == tok.bos_id and ids.count(tok.token_to_id("<|im_start|>")) == 2
  supervised = [t for t, m in zip(ids, rendered.loss_mask) if m > 0]
  assert supervised == tok.encode("Hello.") + [tok.token_to_id("<|im_end|>")]
  assert chat_template.stop_ids(tok, "chatml") == [2, 2]


def test_pickles_for_grain_workers(qwen_dir):
  tok = load_tokenizer(qwen_dir)
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and again.pad_id == tok.pad_id


def test_factory_and_pipeline_pick_the_right_kind(llama3_dir, tiny_tokenizer_path, tmp_path):
  assert isinstance(load_tokenizer(tiny_tokenizer_path), SpmTokenizer)
  data = ml_collections.ConfigDict(dict(tokenizer=llama3_dir, tokenizer_vocab_size=400))
  tok = resolve_tokenizer(data, str(tmp_path))
  assert isinstance(tok, HFTokenizer)
  # Copied into the run, where later stages (tokenizer_of_run) find it.
  copied = load_tokenizer(str(tmp_path / "tokenizer"))
  assert copied.encode(TEXTS[0]) == tok.encode(TEXTS[0])
  assert copied.chat_template == LLAMA3_TEMPLATE

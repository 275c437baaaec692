"""Where every stage's records come from: one dispatch on `config.data.source`.

    load_records(config.data, kind, split, workdir) -> the records of `split`, in order

    kind           records (docs/formats.md)   tiny_world                     files        tfds
    texts          str: pretraining, CPT, MLM  tiny_{domain}-*                .jsonl/.txt  yes
    conversations  Conversation: SFT           tiny_{alpaca,sharegpt,tools}-* .jsonl       yes
    preferences    PreferencePair: RM, DPO     tiny_[sharegpt_]preferences-*  .jsonl       -
    feedback       Feedback: KTO               tiny_feedback-*                .jsonl       -
    prompts        Prompt: RL, synthesis       tiny_prompts[_unseen]-*        .jsonl       yes
    labelled       Labelled: task fine-tuning  tiny_goods-*                   .jsonl       yes

Source 'tiny_world' writes the embedded generated data (data/tiny_world.py, data/tiny_tasks.py)
to `{workdir}/data/` and reads it back like any file. A file is rewritten only when it does not
already hold exactly that text, so resumed runs and the reference-cache fingerprints see the
same files; without a workdir, texts and conversations are generated in memory (the same
records). 'files' reads the comma-separated globs of `config.data.{split}_files` (.jsonl, or
as public datasets are published, a .json array or .parquet). 'tfds' reads
a prepared tfds dataset (`tfds_name`, split `train_split` / `eval_split`) by random access:
texts as its text feature, conversations as records stored feature by feature.

A malformed record is a `RecordError` naming 'file:line' (tfds: the 1-based index), or with
`config.data.skip_invalid` it is skipped, counted by reason in the caller's `SkipCounter` and
logged. Records are read afresh on every call; only the tiny world's text corpus, its largest
data, is written (or checked) and generated in memory once per process, so that a fresh eval
iterator costs a read. data/preferences.py and data/sft.py cache what they build from records.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

from absl import logging
import ml_collections

from data import classify
from data import conversation
from data import records
from data import tfds_builder
from data import tiny_tasks
from data import tiny_world
from data import tool_tasks

SOURCES = ("tiny_world", "files", "tfds")
KINDS = ("texts", "conversations", "preferences", "feedback", "prompts", "labelled")
# 'pairs_eval': the held-out preference pairs of a KTO run (`config.data.pairs_eval_files`).
SPLITS = ("train", "eval", "pairs_eval")
# The sources that serve each kind (tfds: only kinds the stages have read from it so far).
SERVED_BY = {"texts": SOURCES, "conversations": SOURCES, "preferences": ("tiny_world", "files"),
             "feedback": ("tiny_world", "files"), "prompts": SOURCES, "labelled": SOURCES}
# config.data.tiny_task for conversations; 'tools': tool-use demonstrations (data/tool_tasks.py)
TINY_SFT_TASKS = ("alpaca", "sharegpt", "mixed", "tools")
TINY_PREFERENCE_TASKS = {"prompt": "preferences", "sharegpt": "sharegpt_preferences"}
TINY_PROMPT_SETS = ("unseen", "sft")               # config.data.tiny_prompts
# Kinds the tiny world can generate without writing them to a workdir.
_IN_MEMORY = ("texts", "conversations")
# The parser of data/conversation.py for each JSON record kind.
_PARSER_KINDS = {"conversations": "sft", "preferences": "preferences", "feedback": "feedback",
                 "prompts": "prompts"}


def load_records(data_config: ml_collections.ConfigDict, kind: str, split: str,
                 workdir: str | None = None, *, counter: records.SkipCounter | None = None,
                 seed: int = 0, labels: classify.LabelSpec | None = None) -> Sequence:
  """The records of `kind` in `split` of `data_config.source`, in file order.

  Args:
    data_config: `config.data` (source, *_files, tfds_*, tiny_*, text_field, txt_blocks,
      format, skip_invalid).
    kind: one of `KINDS`.
    split: 'train' or 'eval' ('pairs_eval' for preference pairs).
    workdir: where source 'tiny_world' writes its records (`{workdir}/data/`).
    counter: where skipped records are counted (`skip_invalid`).
    seed: the tiny world's sample (RL prompts: `config.seed`); 0 elsewhere.
    labels: labelled records: what a valid label is (data/classify.py `LabelSpec`).

  Returns:
    A list, or a random-access sequence (tuple of tiny-world texts in memory; a tfds
    `TextSource`): texts as `str`, the others as data/conversation.py records (preference
    records give one `PreferencePair` per pair).

  Raises:
    ValueError: an unknown kind, split or source, or a source that does not serve `kind`.
    RecordError: a malformed record, unless `data_config.skip_invalid`.
  """
  source = _check(data_config, kind, split)
  counter = records.SkipCounter() if counter is None else counter
  fmt = data_config.format if kind == "conversations" else "auto"
  parse = _labelled_parser(data_config, labels) if kind == "labelled" else None
  if source == "tfds":
    return _tfds_records(data_config, kind, split, fmt, counter, parse)
  if source == "tiny_world" and not workdir:
    return _tiny_world_in_memory(data_config, kind, split, fmt, seed)
  # The tiny world writes {"text": ...} whatever field the configured files use.
  text_options = (dict(text_field=data_config.text_field, txt_blocks=data_config.txt_blocks)
                  if source == "files" else {})
  return read_files(record_files(data_config, kind, split, workdir, seed=seed), kind, fmt=fmt,
                    skip_invalid=data_config.skip_invalid, counter=counter, parse=parse,
                    **text_options)


def record_files(data_config: ml_collections.ConfigDict, kind: str, split: str,
                 workdir: str | None, *, seed: int = 0) -> list[str]:
  """The files of `split` of `kind`, as parts of comma-separated globs whose records
  `read_files` interleaves (several only for the tiny world's 'mixed' SFT tasks).

  Source 'tiny_world' writes its files under `{workdir}/data/` first; 'files' gives
  `config.data.{split}_files`.
  """
  source = _check(data_config, kind, split)
  if source == "tiny_world":
    if not workdir:
      raise ValueError(f"config.data.source 'tiny_world' writes its {kind} records into the "
                       "run's workdir; pass one")
    return _tiny_world_files(data_config, kind, split, os.path.join(workdir, "data"), seed)
  if source != "files":
    raise ValueError(f"config.data.source {source!r} has no record files")
  patterns = data_config[f"{split}_files"]
  if not patterns:
    raise ValueError(f"config.data.{split}_files is empty")
  return [patterns]


def read_files(parts: Sequence[str], kind: str, *, text_field: str = "text",
               txt_blocks: bool = False, fmt: str = "auto", skip_invalid: bool = False,
               counter: records.SkipCounter | None = None,
               parse: Callable[[Any], Any] | None = None) -> list:
  """The records of `kind` in each part (comma-separated globs), interleaved part by part
  (first[0], second[0], first[1], ...; a part may run longer than the others).

  Args:
    parts: from `record_files`.
    kind: one of `KINDS`.
    text_field: texts: the JSONL field holding the text.
    txt_blocks: texts: a .txt file holds one document per blank-line-separated block.
    fmt: conversations: the SFT record format (`conversation.SFT_FORMATS`).
    skip_invalid: skip (count and log) malformed records instead of raising.
    counter: where skipped records are counted.
    parse: record -> parsed record, instead of the kind's own parser (labelled records:
      data/classify.py `labelled_parser`, whose fields and labels come from the config).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; choose one of {KINDS}")
  if kind == "labelled" and parse is None:
    raise ValueError("labelled records need their parser (data/classify.py labelled_parser)")
  if kind == "texts":
    read = lambda patterns, count: list(records.iter_text_records(
        patterns, text_field=text_field, txt_blocks=txt_blocks, skip_invalid=skip_invalid,
        counter=count))
  else:
    parse = parse or _parser(kind, fmt)
    read = lambda patterns, count: _flatten(kind, records.iter_jsonl_records(
        patterns, parse, skip_invalid=skip_invalid, counter=count))
  return _interleave(*[_counted(functools.partial(read, part), part, counter)
                       for part in parts])


def _check(data_config: ml_collections.ConfigDict, kind: str, split: str) -> str:
  """`data_config.source`, once it is known to serve `split` of `kind`."""
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; choose one of {KINDS}")
  if split not in SPLITS or (split == "pairs_eval" and kind != "preferences"):
    raise ValueError(f"split must be one of {SPLITS} ('pairs_eval': preferences only), got "
                     f"{split!r}")
  source = data_config.source
  if source not in SOURCES:
    raise ValueError(f"unknown config.data.source {source!r}: choose one of {SOURCES}")
  if source not in SERVED_BY[kind]:
    raise ValueError(f"config.data.source {source!r} does not serve {kind} records; use one "
                     f"of {SERVED_BY[kind]}")
  return source


def _labelled_parser(data_config: ml_collections.ConfigDict,
                     labels: classify.LabelSpec | None) -> Callable[[Any], Any]:
  if labels is None:
    raise ValueError("labelled records need a LabelSpec (labels=...)")
  return classify.labelled_parser(data_config, labels)


def _parser(kind: str, fmt: str) -> Callable[[Any], Any]:
  if kind == "conversations":
    return functools.partial(conversation.parse_sft, fmt=fmt)
  return conversation.PARSERS[_PARSER_KINDS[kind]]


def _flatten(kind: str, parsed) -> list:
  # A preference record holds one or more pairs (labelled ShareGPT); the stages read pairs.
  return [pair for pairs in parsed for pair in pairs] if kind == "preferences" else list(parsed)


def _counted(read: Callable[[records.SkipCounter], list], where: str,
             counter: records.SkipCounter) -> list:
  """`read(counter)`, logging what it skipped and adding that to `counter`."""
  local = records.SkipCounter()
  out = read(local)
  if local.skipped:
    logging.warning("%s: skipped %d invalid records %s", where, local.skipped,
                    dict(local.reasons))
    counter.skipped += local.skipped
    counter.reasons.update(local.reasons)
  return out


def _interleave(*parts: list) -> list:
  if len(parts) == 1:
    return parts[0]
  out, longest = [], max(len(p) for p in parts)
  for i in range(longest):
    out.extend(p[i] for p in parts if i < len(p))
  return out


def _tfds_records(data_config: ml_collections.ConfigDict, kind: str, split: str, fmt: str,
                  counter: records.SkipCounter,
                  parse: Callable[[Any], Any] | None = None) -> Sequence:
  tfds_split = data_config.train_split if split == "train" else data_config.eval_split
  if kind == "texts":
    return tfds_builder.open_tfds_source(data_config.tfds_name, data_config.tfds_data_dir,
                                         tfds_split, data_config.text_field)
  read = lambda count: _flatten(kind, tfds_builder.iter_tfds_records(
      data_config.tfds_name, data_config.tfds_data_dir, tfds_split, parse or _parser(kind, fmt),
      skip_invalid=data_config.skip_invalid, counter=count))
  return _counted(read, f"tfds:{data_config.tfds_name}/{tfds_split}", counter)


# --- The tiny world -----------------------------------------------------------------------------

def _tiny_split(split: str) -> str:
  return "train" if split == "train" else "validation"


def _tiny_task_parts(data_config: ml_collections.ConfigDict, kind: str) -> list[tuple]:
  """(data/tiny_tasks.py kind, train records, validation records) of each part of `kind`."""
  num_train, num_eval = data_config.tiny_task_train_records, data_config.tiny_task_eval_records
  if kind == "conversations":
    task = data_config.tiny_task
    if task not in TINY_SFT_TASKS:
      raise ValueError(f"config.data.tiny_task must be one of {TINY_SFT_TASKS}, got {task!r}")
    if task != "mixed":
      return [(task, num_train, num_eval)]
    # 'mixed': Alpaca and ShareGPT records interleaved, Alpaca taking the odd one.
    return [("alpaca", num_train - num_train // 2, num_eval - num_eval // 2),
            ("sharegpt", num_train // 2, num_eval // 2)]
  if kind == "preferences":
    if data_config.tiny_task not in TINY_PREFERENCE_TASKS:
      raise ValueError(f"config.data.tiny_task: unknown {data_config.tiny_task!r} for "
                       f"preference data ({' | '.join(TINY_PREFERENCE_TASKS)})")
    return [(TINY_PREFERENCE_TASKS[data_config.tiny_task], num_train, num_eval)]
  if kind == "prompts":
    return [("prompts", num_train, num_eval)]
  return [(kind, num_train, num_eval)]


def _tiny_world_files(data_config: ml_collections.ConfigDict, kind: str, split: str,
                      out_dir: str, seed: int) -> list[str]:
  tiny_split = _tiny_split(split)
  if kind == "texts":
    return [_tiny_corpus_files(out_dir, data_config.tiny_world_train_docs,
                               data_config.tiny_world_eval_docs, data_config.tiny_world_domain,
                               seed)[tiny_split]]
  if kind == "labelled":
    return [classify.ensure_tiny_goods(out_dir, data_config.tiny_task_train_records,
                                       data_config.tiny_task_eval_records, seed)[tiny_split]]
  if kind == "prompts":
    prompt_set = data_config.tiny_prompts
    if prompt_set not in TINY_PROMPT_SETS:
      raise ValueError(f"config.data.tiny_prompts: unknown {prompt_set!r} "
                       f"({' | '.join(TINY_PROMPT_SETS)})")
    if prompt_set == "unseen":
      num = data_config.tiny_task_train_records + data_config.tiny_task_eval_records
      return [tiny_tasks.ensure_unseen_prompts(out_dir, num, seed)[tiny_split]]
  return [_ensure_tiny_task(out_dir, name, num_train, num_eval, seed)[tiny_split]
          for name, num_train, num_eval in _tiny_task_parts(data_config, kind)]


def _ensure_tiny_task(out_dir: str, name: str, num_train: int, num_eval: int, seed: int
                      ) -> dict:
  """The files of tiny task `name`: a data/tiny_tasks.py kind, or 'tools'."""
  if name == "tools":
    return tool_tasks.ensure_tool_demos(out_dir, num_train, num_eval, seed)
  return tiny_tasks.ensure_tiny_tasks(out_dir, name, num_train, num_eval, seed)


def _tiny_world_in_memory(data_config: ml_collections.ConfigDict, kind: str, split: str,
                          fmt: str, seed: int) -> Sequence:
  if kind not in _IN_MEMORY:
    raise ValueError(f"config.data.source 'tiny_world' writes its {kind} records into the "
                     "run's workdir; pass one")
  tiny_split = _tiny_split(split)
  if kind == "texts":
    num = (data_config.tiny_world_train_docs if split == "train"
           else data_config.tiny_world_eval_docs)
    return _tiny_corpus_docs(tiny_split, num, data_config.tiny_world_domain, seed)
  parse = _parser(kind, fmt)
  make_records = lambda name: (tool_tasks.tool_records if name == "tools"
                                else tiny_tasks.KINDS[name])
  return _interleave(*[[parse(r) for r in make_records(name)(
      tiny_split, num_train if split == "train" else num_eval, seed)]
                       for name, num_train, num_eval in _tiny_task_parts(data_config, kind)])


@functools.lru_cache(maxsize=8)
def _tiny_corpus_files(out_dir: str, num_train: int, num_eval: int, domain: str,
                       seed: int) -> dict:
  # Written and checked once per process, so a fresh eval iterator costs only a read.
  return tiny_world.ensure_tiny_world(out_dir, num_train, num_eval, domain, seed)


@functools.lru_cache(maxsize=8)
def _tiny_corpus_docs(split: str, num: int, domain: str, seed: int) -> tuple:
  return tuple(tiny_world.generate_documents(split, num, seed=seed, domain=domain))

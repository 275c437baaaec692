"""Readers of local record files: JSONL (one JSON object per line), plain text, and the two
forms public datasets are published in: a .json file holding one array of records (Alpaca's
`alpaca_data.json`) and Parquet (Hugging Face hub datasets; row i is record i + 1).

Every reader reports a malformed record as a `RecordError` naming the file, the 1-based line
number and what is wrong, or, with `skip_invalid=True`, skips it and counts it in a
`SkipCounter` by reason (and logs a file whose share of skipped records is above
`SKIPPED_SHARE_WARNING`). Files are decoded line by line, so a line that is not UTF-8 is one
such record (reason 'bad_utf8'), in .txt files too. The JSON-line layer (`iter_jsonl`,
`iter_jsonl_records`) takes a validation hook, so the instruction and preference formats of
later stages reuse it:

    def validate_alpaca(obj):
      return dict(instruction=require_text(obj, "instruction"), ...)

    for example in iter_jsonl_records("sft/*.jsonl", validate_alpaca): ...
"""

import collections
import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterator, TypeVar

import pyarrow.parquet as pq
from absl import logging

T = TypeVar("T")
# A file whose share of skipped records is above this is logged on its own (with its path).
SKIPPED_SHARE_WARNING = 0.1


class InvalidRecord(ValueError):
  """Raised by a validation hook: `reason` is a short key for counting ('missing_field')."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason
    self.detail = detail


class RecordError(ValueError):
  """A malformed record, located: the message reads 'path:line: what is wrong'."""

  def __init__(self, path: str, line_no: int, reason: str, detail: str):
    super().__init__(f"{path}:{line_no}: {detail}")
    self.path = path
    self.line_no = line_no
    self.reason = reason


@dataclasses.dataclass
class SkipCounter:
  """How many records were skipped, in all and per reason ('bad_json', 'empty', ...)."""
  skipped: int = 0
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, reason: str) -> None:
    self.skipped += 1
    self.reasons[reason] += 1


def expand_patterns(patterns: str) -> list:
  """Expands comma-separated globs into a sorted, de-duplicated list of files.

  Raises:
    FileNotFoundError: a pattern matches no file (the message names the pattern).
  """
  paths, seen = [], set()
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not matches:
      raise FileNotFoundError(f"no file matches the pattern {pattern!r}")
    paths.extend(m for m in matches if m not in seen)
    seen.update(matches)
  if not paths:
    raise FileNotFoundError(f"no file patterns given: {patterns!r}")
  return paths


def iter_jsonl(path: str) -> Iterator[tuple]:
  """Yields `(line_no, obj)` for each non-blank line of a JSONL file (1-based line numbers).

  Raises:
    RecordError: a line is not valid JSON (reason 'bad_json').
  """
  for line_no, obj in _iter_jsonl_or_errors(path):
    if isinstance(obj, RecordError):
      raise obj
    yield line_no, obj


def _iter_lines(path: str) -> Iterator[tuple]:
  """Yields `(line_no, text)` per line, or `(line_no, RecordError)` for one that is not UTF-8.

  The file is read as bytes and decoded line by line, so one bad byte costs only its line (and
  names it) instead of a bare UnicodeDecodeError for the whole file.
  """
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        yield line_no, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield line_no, RecordError(path, line_no, "bad_utf8",
                                   f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                   f"{e.start + 1} of the line)")


def _iter_jsonl_or_errors(path: str) -> Iterator[tuple]:
  # Yields a bad line's error instead of raising it, so a caller may skip it and go on.
  for line_no, line in _iter_lines(path):
    if isinstance(line, RecordError):
      yield line_no, line
      continue
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      yield line_no, RecordError(path, line_no, "bad_json",
                                 f"invalid JSON ({e.msg} at column {e.colno})")


def iter_jsonl_records(patterns: str, validate: Callable[[Any], T], *,
                       skip_invalid: bool = False,
                       counter: SkipCounter | None = None) -> Iterator[T]:
  """Yields `validate(obj)` for each JSON line of the files matching `patterns`.

  Args:
    patterns: comma-separated globs of .jsonl files.
    validate: maps a parsed line to a record; raises `InvalidRecord` for a bad one.
    skip_invalid: skip and count bad lines instead of raising.
    counter: where skipped lines are counted (a fresh one is used when None).

  Raises:
    RecordError: a bad line, unless `skip_invalid`.
  """
  counter = SkipCounter() if counter is None else counter
  for path in expand_patterns(patterns):
    yield from _validated_jsonl(path, validate, skip_invalid, counter)


def _iter_objects(path: str) -> Iterator[tuple]:
  """`(line_no, obj)` of a JSONL file's lines, a .json file's top-level array (a published
  dataset such as Alpaca's `alpaca_data.json`) or a .parquet file's rows (the form of Hugging
  Face hub datasets), 1-based; bad lines and a .json file that is not an array of records
  come as `RecordError`s."""
  if path.endswith(".json"):
    try:
      with open(path, encoding="utf-8") as f:
        array = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      yield 1, RecordError(path, 1, "bad_json", f"invalid JSON file ({e})")
      return
    if not isinstance(array, list):
      yield 1, RecordError(path, 1, "not_array", "a .json file must hold a JSON array of "
                           f"records, got {type(array).__name__} (JSONL: one per line)")
      return
    yield from enumerate(array, start=1)
  elif path.endswith(".parquet"):
    for batch_start, batch in _parquet_batches(path):
      yield from enumerate(batch.to_pylist(), start=batch_start + 1)
  else:
    yield from _iter_jsonl_or_errors(path)


def _parquet_batches(path: str) -> Iterator[tuple]:
  """(index of the batch's first row, pyarrow RecordBatch) of a Parquet file, in order."""
  start = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
    yield start, batch
    start += batch.num_rows


def _validated_jsonl(path: str, validate: Callable[[Any], T], skip_invalid: bool,
                     counter: SkipCounter) -> Iterator[T]:
  def records():
    for line_no, obj in _iter_objects(path):
      if isinstance(obj, RecordError):
        yield obj
        continue
      try:
        yield validate(obj)
      except InvalidRecord as e:
        yield RecordError(path, line_no, e.reason, e.detail)
  yield from _keep_valid(path, records(), skip_invalid, counter)


def _keep_valid(path: str, items: Iterator, skip_invalid: bool,
                counter: SkipCounter) -> Iterator:
  """The items of a file that are not `RecordError`s; an error raises, or with `skip_invalid`
  is skipped and counted (in `counter` and, for the share warning, per file)."""
  local, kept = SkipCounter(), 0
  for item in items:
    if not isinstance(item, RecordError):
      kept += 1
      yield item
    elif skip_invalid:
      local.add(item.reason)
      counter.add(item.reason)
    else:
      raise item
  _warn_if_mostly_skipped(path, kept, local)


def _warn_if_mostly_skipped(path: str, kept: int, skipped: SkipCounter) -> None:
  # A few bad lines in a large file are noise; a large share usually means the wrong file,
  # field or format (or, for preferences, pairs that teach nothing), which training would
  # otherwise hide behind one skip count for all the files.
  total = kept + skipped.skipped
  if total and skipped.skipped > SKIPPED_SHARE_WARNING * total:
    logging.warning("%s: skipped %d of %d records (%.0f%%) %s", path, skipped.skipped, total,
                    100 * skipped.skipped / total, dict(skipped.reasons))


def require_text(obj: Any, field: str) -> str:
  """Returns `obj[field]` if `obj` is an object whose `field` is a non-empty string.

  Raises:
    InvalidRecord: with reason 'not_object', 'missing_field', 'wrong_type' or 'empty'.
  """
  if not isinstance(obj, dict):
    raise InvalidRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
  if field not in obj:
    raise InvalidRecord("missing_field", f"missing field {field!r} (fields: "
                        f"{sorted(obj)})")
  value = obj[field]
  if not isinstance(value, str):
    raise InvalidRecord("wrong_type", f"field {field!r} must be a string, got "
                        f"{type(value).__name__}")
  if not value.strip():
    raise InvalidRecord("empty", f"field {field!r} is empty")
  return value


def iter_txt(path: str, blocks: bool = False) -> Iterator[tuple]:
  """Yields `(line_no, text)` per non-blank line, or per blank-line-separated block.

  A block's line number is that of its first line; its lines are joined with newlines.

  Raises:
    RecordError: a line is not valid UTF-8 (reason 'bad_utf8').
  """
  for line_no, text in _iter_txt_or_errors(path, blocks):
    if isinstance(text, RecordError):
      raise text
    yield line_no, text


def _iter_txt_or_errors(path: str, blocks: bool) -> Iterator[tuple]:
  # A block with a line that is not UTF-8 becomes that line's error (the document is lost
  # whole rather than silently shortened).
  start, block, error = 0, [], None
  for line_no, line in _iter_lines(path):
    if isinstance(line, RecordError):
      if not blocks:
        yield line_no, line
        continue
      start, error = start or line_no, error or line
      continue
    if not line.strip():
      if blocks and (block or error):
        yield start, error or "\n".join(block)
        start, block, error = 0, [], None
      continue
    if not blocks:
      yield line_no, line.rstrip("\r\n")
      continue
    start = start or line_no
    block.append(line.rstrip("\r\n"))
  if block or error:
    yield start, error or "\n".join(block)


def iter_text_records(patterns: str, text_field: str = "text", txt_blocks: bool = False,
                      skip_invalid: bool = False,
                      counter: SkipCounter | None = None) -> Iterator[str]:
  """Yields the text of every record in the .jsonl / .txt files matching `patterns`.

  Args:
    patterns: comma-separated globs; files are read in sorted order per pattern.
    text_field: the JSONL field holding the text.
    txt_blocks: .txt files hold one document per blank-line-separated block, not per line.
    skip_invalid: skip and count malformed records instead of raising.
    counter: where skipped records are counted.

  Raises:
    RecordError: a malformed record (not UTF-8, bad JSON, not an object, missing field, wrong
      type, empty text; in a .txt file only not UTF-8), unless `skip_invalid`.
    ValueError: a file that is neither .jsonl nor .txt.
  """
  counter = SkipCounter() if counter is None else counter
  validate = lambda obj: require_text(obj, text_field)
  for path in expand_patterns(patterns):
    if path.endswith((".jsonl", ".json", ".parquet")):
      yield from _validated_jsonl(path, validate, skip_invalid, counter)
    elif path.endswith(".txt"):
      yield from _checked_txt(path, txt_blocks, skip_invalid, counter)
    else:
      raise ValueError(f"{path}: unsupported file type (expected .jsonl, .json, .parquet or "
                       ".txt)")


def _checked_txt(path: str, blocks: bool, skip_invalid: bool,
                 counter: SkipCounter) -> Iterator[str]:
  texts = (text for _, text in _iter_txt_or_errors(path, blocks))
  yield from _keep_valid(path, texts, skip_invalid, counter)
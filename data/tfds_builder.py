"""tfds datasets of local text files, stored as array_record and read by random access.

`build_text_dataset` turns local .jsonl / .txt files (read by `data/records.py`) into a
tfds dataset `{data_dir}/{name}/1.0.0/` with one feature, `text`, in array_record files.
`open_tfds_source` opens that dataset, or any tfds dataset already prepared in array_record
format in a data_dir, as a random-access source of strings for grain. `iter_tfds_records`
reads a prepared dataset whose features are a JSON record's fields (an instruction record,
docs/formats.md) and validates each like a JSONL line, naming a bad one by its 1-based index.
None of them needs TensorFlow: tfds writes and reads array_record through its own Python code.

Files are read in order and not shuffled when written (`disable_shuffling`): the loader
shuffles, and record i of the dataset is record i of the input files.
"""

from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import tensorflow_datasets as tfds

from data import records

T = TypeVar("T")

_VERSION = "1.0.0"


class LocalTextDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder whose splits are globs of local text files; its name is chosen per use."""

  VERSION = tfds.core.Version(_VERSION)
  # Nothing is downloaded, so there are no URL checksums to look up. tfds's default lookup
  # locates this module through `importlib_resources`, which tfds 4.9.10 uses but does not
  # install; without this override preparing fails with ModuleNotFoundError.
  url_infos = None

  def __init__(self, *, name: str, split_files: dict, data_dir: str, text_field: str = "text",
               txt_blocks: bool = False, skip_invalid: bool = False):
    """Args:
      name: dataset name (lower_snake_case), the folder under `data_dir`.
      split_files: split name -> comma-separated globs of .jsonl / .txt files.
      data_dir: root folder of prepared tfds datasets.
      text_field: JSONL field holding the text.
      txt_blocks: .txt files hold one document per blank-line-separated block.
      skip_invalid: skip malformed records instead of failing the build.
    """
    self.name = name  # the registered-class name is per instance here, as in tfds's adhoc builder
    self._split_files = dict(split_files)
    self._read_args = dict(text_field=text_field, txt_blocks=txt_blocks,
                           skip_invalid=skip_invalid)
    super().__init__(data_dir=data_dir, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Local text files: {self._split_files}",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    return {split: self._generate_examples(patterns)
            for split, patterns in self._split_files.items()}

  def _generate_examples(self, patterns: str):
    for i, text in enumerate(records.iter_text_records(patterns, **self._read_args)):
      yield i, {"text": text}


def build_text_dataset(name: str, train_files: str, eval_files: str, data_dir: str,
                       text_field: str = "text", *, eval_split: str = "validation",
                       txt_blocks: bool = False, skip_invalid: bool = False,
                       overwrite: bool = False) -> LocalTextDataset:
  """Prepares `{data_dir}/{name}/1.0.0` with splits 'train' and `eval_split` as array_record.

  An already prepared dataset is reused as is (its files are not compared with the inputs),
  unless `overwrite`.

  Args:
    name: dataset name (lower_snake_case).
    train_files: comma-separated globs of .jsonl / .txt files for 'train'.
    eval_files: globs for `eval_split` ('' for none).
    data_dir: root folder of prepared tfds datasets.
    text_field: JSONL field holding the text.
    eval_split: name of the held-out split.
    txt_blocks: .txt files hold one document per blank-line-separated block.
    skip_invalid: skip malformed records instead of failing.
    overwrite: rebuild even if already prepared.

  Returns:
    The prepared builder; `builder.as_data_source()` gives its splits.
  """
  split_files = {"train": train_files}
  if eval_files:
    split_files[eval_split] = eval_files
  builder = LocalTextDataset(name=name, split_files=split_files, data_dir=data_dir,
                             text_field=text_field, txt_blocks=txt_blocks,
                             skip_invalid=skip_invalid)
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=mode))
  return builder


class TextSource:
  """Random access to the text feature of a tfds array_record split: `source[i] -> str`."""

  def __init__(self, source, text_field: str = "text"):
    self._source = source
    self._text_field = text_field

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    return _to_str(self._source[index][self._text_field])

  def __getitems__(self, indices) -> list:
    return [_to_str(r[self._text_field]) for r in self._source.__getitems__(list(indices))]

  def __repr__(self) -> str:
    return f"TextSource({self._source!r}, text_field={self._text_field!r})"


def _to_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_tfds_source(name: str, data_dir: str, split: str,
                     text_field: str = "text") -> TextSource:
  """Opens a split of a tfds dataset prepared as array_record under `data_dir`.

  Args:
    name: dataset name, optionally with config and version ('my_text:1.0.0').
    data_dir: root folder of prepared tfds datasets ('' for the tfds default).
    split: split name, or a tfds slice ('train[:10%]').
    text_field: the feature holding the text.

  Returns:
    A random-access source of strings (`len`, `[i]`), usable by grain.
  """
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  return TextSource(source, text_field)


def example_to_json(example: dict) -> dict:
  """A tfds example as the JSON record it stores: bytes -> str, arrays -> lists, and a
  sequence of dicts (which tfds stores as a dict of equal-length lists) -> a list of dicts.
  Only nested features are transposed; the record itself stays a dict."""
  return {k: _plain(v) for k, v in example.items()}


def _plain(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return _plain(value.tolist()) if value.ndim else _plain(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    out = {k: _plain(v) for k, v in value.items()}
    lists = list(out.values())
    if lists and all(isinstance(v, list) for v in lists) and len({len(v) for v in lists}) == 1:
      return [dict(zip(out, row)) for row in zip(*lists)]
    return out
  return value


def iter_tfds_records(name: str, data_dir: str, split: str, validate: Callable[[Any], T], *,
                      skip_invalid: bool = False,
                      counter: records.SkipCounter | None = None) -> Iterator[T]:
  """Yields `validate(record)` for each example of a prepared tfds split, in order.

  Args:
    name: dataset name, optionally with config and version.
    data_dir: root folder of prepared tfds datasets ('' for the tfds default).
    split: split name, or a tfds slice.
    validate: maps a record (`example_to_json`) to a parsed one; raises `InvalidRecord`.
    skip_invalid: skip and count bad examples instead of raising.
    counter: where skipped examples are counted.

  Raises:
    RecordError: a bad example as 'tfds:{name}/{split}:{index + 1}: ...', unless
      `skip_invalid`.
  """
  counter = records.SkipCounter() if counter is None else counter
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  where = f"tfds:{name}/{split}"
  for index in range(len(source)):
    try:
      yield validate(example_to_json(source[index]))
    except records.InvalidRecord as e:
      # The record's 1-based index plays the part of a line number.
      error = records.RecordError(where, index + 1, e.reason, e.detail)
      if not skip_invalid:
        raise error from None
      counter.add(error.reason)

"""Streaming safetensors I/O for Hugging Face model folders, with numpy only (no torch).

`HFReader` opens a folder holding `model.safetensors` or a sharded set indexed by
`model.safetensors.index.json` and hands out one tensor at a time: files are memory-mapped, so
reading a tensor costs that tensor's memory only. `HFWriter` takes tensors one at a time and
writes a shard whenever the buffered tensors reach `max_shard_bytes`, then the index, in the
layout `transformers` expects (`model-00001-of-00003.safetensors`, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models.convert.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFReader(contextlib.AbstractContextManager):
  """Random access to the tensors of a (possibly sharded) safetensors checkpoint folder."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path, encoding="utf-8") as f:
          self._file_of = dict(json.load(f)["weight_map"])
      except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index_path}: not a safetensors index ({e})") from None
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      with self._open(SINGLE_FILE) as f:
        self._file_of = {name: SINGLE_FILE for name in f.keys()}
    else:
      raise ConversionError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                            "(only safetensors checkpoints are read)")
    self._handles: dict[str, object] = {}

  def keys(self) -> list[str]:
    return sorted(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def _open(self, file_name: str):
    path = os.path.join(self.directory, file_name)
    try:
      return safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError, OSError: a missing, truncated or foreign file.
      raise ConversionError(f"{path}: cannot read safetensors ({e})") from None

  def _handle(self, file_name: str):
    if file_name not in self._handles:
      self._handles[file_name] = self._open(file_name).__enter__()
    return self._handles[file_name]

  def file_of(self, name: str) -> str:
    """Path of the file holding tensor `name` (the folder when no file lists it)."""
    file_name = self._file_of.get(name)
    return os.path.join(self.directory, file_name) if file_name else self.directory

  def info(self, name: str) -> tuple[tuple[int, ...], str]:
    """(shape, safetensors dtype name such as "BF16") of tensor `name`, from the file's
    header: nothing is read."""
    view = self._handle(self._file_of[name]).get_slice(name)
    return tuple(view.get_shape()), view.get_dtype()

  def get(self, name: str) -> np.ndarray:
    """The tensor `name` as a numpy array (bfloat16 comes back as `ml_dtypes.bfloat16`)."""
    if name not in self._file_of:
      raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
    handle = self._handle(self._file_of[name])
    try:
      return handle.get_tensor(name)
    except Exception as e:  # a truncated file, or an index naming a tensor its shard lacks
      raise ConversionError(f"{self.file_of(name)}: cannot read tensor {name} ({e})") from None

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()

  def __exit__(self, *exc_info) -> None:
    self.close()


class HFWriter(contextlib.AbstractContextManager):
  """Writes tensors into safetensors shards of at most `max_shard_bytes` (one tensor may exceed
  it alone), holding at most one shard in memory. `close()` names the shards and writes the
  index; a folder with a single shard gets `model.safetensors` and no index."""

  def __init__(self, directory: str, max_shard_bytes: int = 5 << 30):
    os.makedirs(directory, exist_ok=True)
    self.directory = directory
    self.max_shard_bytes = max_shard_bytes
    self._buffer: dict[str, np.ndarray] = {}
    self._buffer_bytes = 0
    self._shards: list[tuple[str, list[str]]] = []   # (temporary file name, tensor names)
    self._total_bytes = 0
    self._names: set[str] = set()

  def add(self, name: str, array: np.ndarray) -> None:
    if name in self._names:
      raise ValueError(f"tensor {name!r} written twice")
    self._names.add(name)
    array = np.ascontiguousarray(array)
    if self._buffer and self._buffer_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._buffer[name] = array
    self._buffer_bytes += array.nbytes
    self._total_bytes += array.nbytes

  def _flush(self) -> None:
    file_name = f"shard-{len(self._shards):05d}.safetensors.tmp"
    save_file(self._buffer, os.path.join(self.directory, file_name), metadata={"format": "pt"})
    self._shards.append((file_name, sorted(self._buffer)))
    self._buffer, self._buffer_bytes = {}, 0

  def close(self) -> None:
    if self._buffer:
      self._flush()
    count = len(self._shards)
    if count == 1:
      os.replace(os.path.join(self.directory, self._shards[0][0]),
                 os.path.join(self.directory, SINGLE_FILE))
    elif count > 1:
      weight_map = {}
      for i, (tmp_name, names) in enumerate(self._shards):
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(os.path.join(self.directory, tmp_name), os.path.join(self.directory, final))
        weight_map.update({name: final for name in names})
      index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
      with open(os.path.join(self.directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    self._shards = []

  def __exit__(self, exc_type, *exc_info) -> None:
    if exc_type is None:
      self.close()


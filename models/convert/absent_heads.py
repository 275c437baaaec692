"""Checkpoints as published: a base model without the task head our model kind needs.

Hub checkpoints are often the bare body: `LlamaModel`, `Qwen2Model`, a sentence-transformers
`BertModel` (no `cls.` MLM head, no `bert.` prefix), or a causal LM converted into a reward
model (no `score.weight`). A family lists its heads' leading scopes (`Family.heads`); a head
none of whose tensors is in the files is *absent*, and its params start as the module itself
would start them (norm scales 1, biases 0, weights N(0, init_std), as in models/decoder.py,
models/encoder.py and models/heads.py), with one log line saying so. A head with some but not
all of its tensors is an error: that is a damaged checkpoint, not a base model. A tied LM head
needs nothing: the embedding is the head.

The opposite case, a head in the files our kind has no place for (the LM head when converting
a causal LM into a reward model, `score.weight` into a decoder), is dropped with a log line,
as `*ForSequenceClassification` drops the LM head.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from models.convert.families import Family, Path, TensorMap


def head_of(family: Family, hf_name: str) -> str | None:
  """The head scope (`lm_head.`, `cls.`, ...) an HF tensor name belongs to, or None (body)."""
  return next((scope for scope in family.heads if hf_name.startswith(scope)), None)


def absent_head_maps(maps: Iterable[TensorMap], family: Family,
                     names: Iterable[str]) -> list[TensorMap]:
  """The maps of `maps` that belong to a head none of whose tensors is in `names`."""
  present = {head_of(family, n) for n in names}
  return [m for m in maps if not m.per_layer and all(head_of(family, n) for n in m.hf)
          and not any(head_of(family, n) in present for n in m.hf)]


def fresh_param(path: Path, shape: tuple[int, ...], dtype: np.dtype, init_std: float,
                seed: int = 0) -> np.ndarray:
  """A head param as its module initialises it: `scale` ones, `*bias` zeros, else normal."""
  leaf = path[-1]
  if leaf == "scale":
    return np.ones(shape, dtype)
  if leaf.endswith("bias"):
    return np.zeros(shape, dtype)
  # A fixed seed per path: a rerun of the same conversion writes the same params.
  rng = np.random.default_rng([seed, *map(ord, "/".join(path))])
  return (rng.standard_normal(shape, np.float32) * init_std).astype(dtype)


def describe_absent(maps: list[TensorMap]) -> str:
  """`'cls.predictions.bias, ... -> head_dense, ...'` for a log line."""
  hf = ", ".join(n for m in maps for n in m.hf)
  ours = ", ".join("/".join(p) for m in maps for p in m.ours)
  return f"{hf} -> {ours}"

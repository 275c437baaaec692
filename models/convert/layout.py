"""Our side of a conversion: where a table entry's param lives and how its values are laid out.

Block params sit under `params["blocks"]["layers"]`: stacked along a leading layer axis when
`config.model.scan_layers`, else as per-layer dicts keyed 0..n-1. `block_leaf` hides the
difference; `to_ours` / `to_hf` apply a `TensorMap`'s layout kind to numpy arrays. Kind
`experts` (models/convert/families_moe.py): one nn.Linear weight `[out, in]` per expert <->
ours `[experts, in, out]`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from models.convert.families import Path, TensorMap


def get_path(tree: Any, path: Sequence) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: Sequence, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def leaf_path(m: TensorMap, j: int, layer: int | None, scanned: bool) -> tuple:
  """Full path of our `j`-th param of `m` (for layer `layer` when per-layer and unscanned)."""
  if not m.per_layer:
    return m.ours[j]
  if scanned:
    return ("blocks", "layers") + m.ours[j]
  return ("blocks", "layers", layer) + m.ours[j]


def layer_shape(shapes: Any, m: TensorMap, j: int, scanned: bool) -> tuple[int, ...]:
  """Shape of one layer's slice of our `j`-th param of `m`."""
  full = tuple(get_path(shapes, leaf_path(m, j, 0, scanned)).shape)
  return full[1:] if (m.per_layer and scanned) else full


def _matrix(w: np.ndarray, n_in: int) -> np.ndarray:
  """Ours `[*in_dims, *out_dims]` -> HF-style `[in, out]` (a flat vector when n_in == 0)."""
  if n_in == 0:
    return w.reshape(-1)
  return w.reshape(math.prod(w.shape[:n_in]), -1)


def to_ours(m: TensorMap, hf: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list:
  """HF arrays of `m` -> our arrays of the given (per-layer) shapes."""
  if m.kind == "experts":
    return [np.stack([x.T for x in hf]).reshape(shapes[0])]
  (x,) = hf
  if m.kind == "linear":
    return [x.T.reshape(shapes[0])]
  if m.kind in ("conv1d", "copy"):
    return [x.reshape(shapes[0])]
  if m.kind == "split":
    sizes = np.cumsum([math.prod(s[m.n_in:]) for s in shapes])[:-1]
    return [p.reshape(s) for p, s in zip(np.split(x, sizes, axis=-1), shapes)]
  raise ValueError(f"unknown layout kind {m.kind!r}")


def to_hf(m: TensorMap, ours: list[np.ndarray]) -> list[np.ndarray]:
  """Our (per-layer) arrays of `m` -> its HF arrays."""
  if m.kind == "experts":
    return [w.T for w in ours[0]]
  if m.kind == "linear":
    return [_matrix(ours[0], m.n_in).T]
  if m.kind == "conv1d":
    return [_matrix(ours[0], m.n_in)]
  if m.kind == "copy":
    return [ours[0] if m.n_in else ours[0].reshape(-1)]
  if m.kind == "split":
    return [np.concatenate([_matrix(w, m.n_in) for w in ours], axis=-1)]
  raise ValueError(f"unknown layout kind {m.kind!r}")


def hf_names(m: TensorMap, layer: int | None) -> list[str]:
  return [n.format(i=layer) for n in m.hf]


def our_paths(maps: list[TensorMap], num_layers: int, scanned: bool) -> list[Path]:
  """Every our-param path the maps fill (to check a conversion covers the whole model)."""
  paths = []
  for m in maps:
    layers = [None] if (not m.per_layer or scanned) else range(num_layers)
    for j in range(len(m.ours)):
      paths += [leaf_path(m, j, i, scanned) for i in layers]
  return paths

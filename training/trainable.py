"""Partial fine-tuning: train only the head, or the top k blocks and the head, of a model.

`config.train.trainable` picks what trains (LoRA, models/lora.py, is the other way to train a
part):

    all            every param (the default)
    head           the params outside the transformer body `BODY`: a classifier's `score` or
                   pooler + `classifier`, a reward model's `score`, an untied LM head (an MLM
                   encoder's head), i.e. a linear probe on frozen features
    top_k_layers   the last `config.train.trainable_top_k` blocks, the final norm and the head

The train state keeps *all* params (checkpoints, evaluation, export and later stages see the
whole model as usual); what is frozen is decided by three pieces built here:

  - `TrainableParts.optimizer(inner)`: the optimizer sees only the trained parts (`select`),
    so frozen params have no Adam moments at all; its updates are put back in place
    (`expand`) with -0.0 for the frozen parts, since p + (-0.0) == p bit for bit for every
    p (+0.0 would turn a -0.0 param into +0.0);
  - `PartialSpec.bind`: the model is bound from params whose frozen parts pass through
    `stop_gradient`, so autodiff computes no gradient for them: the backward pass stops at
    the lowest trained block (unrolled layers) and no weight gradient of a frozen block is
    formed. With `scan_layers` the blocks are one stacked array per weight run by one scanned
    loop; a stacked weight trains rows [L - k, L) (`select` slices them, the moments are
    `[k, ...]`), but the scanned backward still runs through every layer, producing zeros
    for the frozen rows that nothing stores: unroll the layers (`scan_layers=False`) to skip
    that compute as well;
  - `trainable_parts` checks the settings before anything is built, naming the config key.

Example: 4 scanned layers, top_k_layers with k = 1: `blocks/layers/attn/q` `[4, d, h, hd]`
trains row 3 (its moments are `[1, d, h, hd]`), `final_norm` and `score` train whole,
`embed` is frozen (no moments).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from models.build import ModelSpec, Params

MODES = ("all", "head", "top_k_layers")
# The transformer body: embeddings (+ their norm), the blocks and the final norm. Every other
# top-level param is a head.
BODY = ("embed", "pos_embed", "type_embed", "embed_norm", "blocks", "final_norm")
# `TrainableParts.starts` leaf values: FROZEN, WHOLE, or s > 0: rows s.. of a stacked leaf.
FROZEN, WHOLE = -1, 0

Path = tuple


def _keys(path) -> Path:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _flatten(tree: Any) -> dict[Path, Any]:
  return {_keys(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _nest(flat: dict[Path, Any]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


@dataclasses.dataclass(frozen=True)
class TrainableParts:
  """What trains of each param (see the module docstring). `starts` maps every param path to
  FROZEN, WHOLE, or the first trained row of a stacked-layers param."""
  mode: str
  starts: dict[Path, int]

  def select(self, tree: Any) -> dict:
    """The trained parts of a params-shaped tree (params, gradients): frozen leaves left out,
    stacked leaves cut to their trained rows."""
    flat = _flatten(tree)
    return _nest({path: (leaf if start == WHOLE else leaf[start:])
                  for path, leaf in flat.items()
                  if (start := self.starts[path]) != FROZEN})

  def expand(self, selected: Any, like: Any) -> Any:
    """`selected` (as `select` returns) put back into a tree shaped like `like`, -0.0 in the
    frozen parts."""
    flat = _flatten(selected)

    def place(path, leaf):
      path = _keys(path)
      start = self.starts[path]
      if start == WHOLE:
        return flat[path]
      rows = leaf.shape[0] if start == FROZEN else start
      zeros = jnp.full((rows,) + leaf.shape[1:], -0.0, leaf.dtype)
      return zeros if start == FROZEN else jnp.concatenate([zeros, flat[path]], axis=0)
    return jax.tree_util.tree_map_with_path(place, like)

  def freeze(self, params: Any) -> Any:
    """`params` with `stop_gradient` on every frozen part: no gradient is computed for them."""
    def cut(path, leaf):
      start = self.starts[_keys(path)]
      if start == WHOLE:
        return leaf
      if start == FROZEN:
        return jax.lax.stop_gradient(leaf)
      return jnp.concatenate([jax.lax.stop_gradient(leaf[:start]), leaf[start:]], axis=0)
    return jax.tree_util.tree_map_with_path(cut, params)

  def optimizer(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to the trained parts only: its state (moments) holds nothing else."""
    def init(params):
      return inner.init(self.select(params))

    def update(updates, state, params=None):
      selected, state = inner.update(self.select(updates), state,
                                     None if params is None else self.select(params))
      return self.expand(selected, updates), state
    return optax.GradientTransformation(init, update)

  def count(self, shapes: Params) -> tuple[int, int]:
    """(trained, frozen) parameter counts of `shapes`."""
    trained = total = 0
    for path, leaf in _flatten(shapes).items():
      size = int(leaf.size) if hasattr(leaf, "size") else int(jnp.size(leaf))
      total += size
      start = self.starts[path]
      if start != FROZEN:
        trained += size - size // leaf.shape[0] * start if start else size
    return trained, total - trained


def _is_stacked(axes: tuple) -> bool:
  return bool(axes) and axes[0] == "layers"


def trainable_parts(train_cfg: ml_collections.ConfigDict, spec: ModelSpec
                    ) -> TrainableParts | None:
  """The parts of `spec`'s params that `config.train.trainable` trains; None for 'all'.

  Raises:
    ValueError: an unknown mode, a `trainable_top_k` outside [1, layers], a model with no
      head params ('head') or no blocks ('top_k_layers'), each naming its config key.
  """
  mode = train_cfg.get("trainable", "all")
  if mode not in MODES:
    raise ValueError(f"config.train.trainable: unknown {mode!r} ({' | '.join(MODES)})")
  if mode == "all":
    return None
  flat_shapes = _flatten(spec.shapes)
  flat_axes = _flatten_axes(spec.logical_axes)
  if mode == "head" and all(path[0] in BODY for path in flat_shapes):
    raise ValueError(f"config.train.trainable={mode!r}: the model has no head params outside "
                     f"its body {BODY} (a decoder LM with tied embeddings has none)")
  starts = {path: (WHOLE if path[0] not in BODY else FROZEN) for path in flat_shapes}
  if mode == "top_k_layers":
    block_paths = [p for p in flat_shapes if p[:2] == ("blocks", "layers")]
    if not block_paths:
      raise ValueError("config.train.trainable='top_k_layers': the model has no "
                       "blocks/layers params")
    stacked = _is_stacked(flat_axes[block_paths[0]])
    num_layers = (flat_shapes[block_paths[0]].shape[0] if stacked
                  else len({p[2] for p in block_paths}))
    k = int(train_cfg.get("trainable_top_k", 0))
    if not 1 <= k <= num_layers:
      raise ValueError(f"config.train.trainable_top_k must be in [1, {num_layers}] (the "
                       f"model's layers), got {k}")
    first = num_layers - k
    for path in block_paths:
      if stacked:
        starts[path] = WHOLE if first == 0 else first
      else:
        starts[path] = WHOLE if int(path[2]) >= first else FROZEN
    starts.update({p: WHOLE for p in flat_shapes if p[0] == "final_norm"})
  return TrainableParts(mode, starts)


def _flatten_axes(logical_axes: Params) -> dict[Path, tuple]:
  # Logical axes are tuples: leaves here, not pytree nodes.
  return {_keys(p): axes for p, axes in jax.tree_util.tree_leaves_with_path(
      logical_axes, is_leaf=lambda x: isinstance(x, tuple))}


@dataclasses.dataclass(frozen=True)
class PartialSpec(ModelSpec):
  """A `ModelSpec` whose `bind` stops the gradient of the frozen parts (module docstring);
  shapes, init and everything else are the model's own."""
  parts: TrainableParts | None = None

  @classmethod
  def wrap(cls, spec: ModelSpec, parts: TrainableParts) -> PartialSpec:
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelSpec)}
    return cls(**fields, parts=parts)

  def bind(self, params: Params):
    return super().bind(self.parts.freeze(params))


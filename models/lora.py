"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W gets a trainable low-rank update: W_eff = W + (alpha / r) * A @ B, with
A `[in, r]` (random) and B `[r, out]` (zeros, so training starts exactly at the base model).

Design: adapters are a separate pytree, merged functionally into the base params inside the
step; no module changes. The adapter tree mirrors the base params' paths, each target weight
replaced by `{"a": A, "b": B}`, with our weight layouts kept (`q [d, heads, head_dim]` gets
A `[d, r]`, B `[r, heads, head_dim]`; scanned stacks keep their leading layer axis). Because
`LoraSpec` has `init`, `shapes` and `logical_axes` like a `ModelSpec`, the train state,
optimizer and shardings (training/state.py) work on the adapters unchanged; the base goes into
the step as a frozen param (`training/step.py` `LORA_BASE`), so it gets no gradients, no
optimizer state, and is the same arrays as the DPO / PPO reference at no extra memory.

A task head outside the decoder body (a reward model's `score`) is trained in full next to the
adapters (as PEFT's `modules_to_save`); it is new, so it has no frozen value to adapt.

Dropout: a weight-space merge cannot drop per token, so `dropout` drops input features of the
adapter path, one mask per layer and step shared by all tokens of the batch (rows of A, scaled
by 1 / (1 - p)); it has per-token LoRA dropout's expectation, not its variance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.build import ModelSpec, Params

# Projection name -> how many leading (non-layer) dims of its weight are input dims.
TARGET_INPUT_DIMS: dict[str, int] = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1,
                                     "down": 1}


def parse_targets(targets: str | tuple | list) -> tuple[str, ...]:
  names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)
                if t.strip())
  unknown = [t for t in names if t not in TARGET_INPUT_DIMS]
  if unknown or not names:
    raise ValueError(f"config.lora.targets: unknown {unknown or names}; choose from "
                     f"{', '.join(TARGET_INPUT_DIMS)}")
  return names


@dataclasses.dataclass(frozen=True)
class Target:
  path: tuple            # path of the base weight in params
  n_stack: int           # leading layer dims (1 for a scanned stack, else 0)
  n_in: int              # input dims after the stack


def _find_targets(spec: ModelSpec, names: tuple[str, ...]) -> list[Target]:
  targets = []
  for path, axes in jax.tree_util.tree_leaves_with_path(
      spec.logical_axes, is_leaf=lambda x: isinstance(x, tuple)):
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    if "blocks" in keys and keys[-1] in names:
      n_stack = 1 if axes and axes[0] == "layers" else 0
      targets.append(Target(keys, n_stack, TARGET_INPUT_DIMS[keys[-1]]))
  if not targets:
    raise ValueError(f"config.lora.targets {names} match no weight of the model")
  return targets


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def lora_delta(a: jax.Array, b: jax.Array, weight_shape: tuple, n_stack: int,
               scale: float) -> jax.Array:
  """scale * A @ B in the weight's layout: A `[*stack, *in, r]`, B `[*stack, r, *out]`."""
  stack = a.shape[:n_stack]
  a2 = a.reshape(stack + (-1, a.shape[-1]))
  b2 = b.reshape(stack + (b.shape[n_stack], -1))
  return (jnp.matmul(a2, b2) * scale).reshape(weight_shape)


# Top-level params of the model body (decoder, and the encoder's token-type embeddings and
# embedding norm); any other top-level param (a reward / value `score` head, the MLM head) is a
# task head, trained in full next to the adapters.
BODY_PARAMS = ("embed", "pos_embed", "type_embed", "embed_norm", "blocks", "final_norm",
               "lm_head")


def _without(tree: dict, keys) -> dict:
  return {k: v for k, v in tree.items() if k not in keys}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Adapters for a base `ModelSpec`: quacks like a ModelSpec for the train state.

  Trained params: `{**adapters, **heads}`, heads being the base's top-level params outside
  `BODY_PARAMS` (a reward model's `score`). Frozen base: every other param (`base_shapes`).
  """
  base: ModelSpec
  targets: tuple[Target, ...]
  rank: int
  scale: float
  dropout: float
  heads: tuple[str, ...]
  shapes: Params
  logical_axes: Params

  @property
  def base_shapes(self) -> Params:
    return _without(self.base.shapes, self.heads)

  @property
  def base_logical_axes(self) -> Params:
    return _without(self.base.logical_axes, self.heads)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.base.config

  def init(self, rng: jax.Array) -> Params:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default bound), B = 0: W_eff == W at start."""
    head_key, rng = jax.random.split(rng)
    # Under jit only the head's part of this init survives dead-code elimination.
    adapters: dict = {name: self.base.init(head_key)[name] for name in self.heads}
    for target, key in zip(self.targets, jax.random.split(rng, len(self.targets))):
      a_shape = _get(self.shapes, target.path + ("a",))
      b_shape = _get(self.shapes, target.path + ("b",))
      fan_in = math.prod(a_shape.shape[target.n_stack:-1])
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, a_shape.shape, a_shape.dtype, -bound, bound)
      _set(adapters, target.path, {"a": a, "b": jnp.zeros(b_shape.shape, b_shape.dtype)})
    return adapters

  def merge(self, base_params: Params, adapters: Params, rng: jax.Array | None = None
            ) -> Params:
    """Base params with every target weight replaced by W + scale * A @ B.

    `rng` (training only) draws the adapter-input dropout masks; None: no dropout.
    """
    merged = jax.tree.map(lambda x: x, base_params)  # new containers, same leaves
    merged.update({name: adapters[name] for name in self.heads})
    keys = (jax.random.split(rng, len(self.targets)) if rng is not None and self.dropout > 0
            else [None] * len(self.targets))
    for target, key in zip(self.targets, keys):
      w = _get(base_params, target.path)
      a, b = _get(adapters, target.path + ("a",)), _get(adapters, target.path + ("b",))
      if key is not None:
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, a.shape[:-1] + (1,))
        a = jnp.where(keep, a / (1.0 - self.dropout), 0.0).astype(a.dtype)
      delta = lora_delta(a, b, w.shape, target.n_stack, self.scale)
      _set(merged, target.path, (w + delta.astype(w.dtype)).astype(w.dtype))
    return merged

  def bind(self, adapters: Params, base_params: Params, rng: jax.Array | None = None
           ) -> nnx.Module:
    """The adapted model: the base module bound to the merged params."""
    return self.base.bind(self.merge(base_params, adapters, rng))


def make_lora_spec(base: ModelSpec, lora_cfg: ml_collections.ConfigDict) -> LoraSpec:
  """Adapter shapes and logical axes for `base` from `config.lora` (rank, alpha, dropout,
  targets). The rank dim is `lora_rank` (replicated: r is small); the others keep the
  weight's, so A and B are sharded like the weight they adapt."""
  rank = int(lora_cfg.rank)
  if rank < 1:
    raise ValueError(f"config.lora.rank must be >= 1, got {rank}")
  if not 0.0 <= lora_cfg.dropout < 1.0:
    raise ValueError(f"config.lora.dropout must be in [0, 1), got {lora_cfg.dropout}")
  targets = _find_targets(base, parse_targets(lora_cfg.targets))
  heads = tuple(k for k in base.shapes if k not in BODY_PARAMS)
  shapes: dict = {k: base.shapes[k] for k in heads}
  axes: dict = {k: base.logical_axes[k] for k in heads}
  for t in targets:
    w = _get(base.shapes, t.path)
    w_axes = _get(base.logical_axes, t.path)
    split = t.n_stack + t.n_in
    stack, ins, outs = w.shape[:t.n_stack], w.shape[t.n_stack:split], w.shape[split:]
    _set(shapes, t.path, {"a": jax.ShapeDtypeStruct(stack + ins + (rank,), w.dtype),
                          "b": jax.ShapeDtypeStruct(stack + (rank,) + outs, w.dtype)})
    _set(axes, t.path, {"a": w_axes[:split] + ("lora_rank",),
                        "b": w_axes[:t.n_stack] + ("lora_rank",) + w_axes[split:]})
  return LoraSpec(base=base, targets=tuple(targets), rank=rank,
                  scale=float(lora_cfg.alpha) / rank, dropout=float(lora_cfg.dropout),
                  heads=heads, shapes=shapes, logical_axes=axes)


def merge_lora(base_params: Params, adapters: Params, spec: LoraSpec) -> Params:
  """Adapters folded into the base for export or inference (no dropout)."""
  return spec.merge(base_params, adapters)


def is_enabled(config: Any) -> bool:
  lora = config.get("lora") if hasattr(config, "get") else None
  return bool(lora and lora.get("enabled"))


def trained_count(spec: LoraSpec) -> int:
  """Trained parameters: adapters plus heads."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(spec.shapes))


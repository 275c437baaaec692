"""Weight-only int8 quantization for sampling: each matrix read as int8 plus a float32 scale.

Decoding is bound by memory bandwidth: every step reads every weight once to produce one
token per row (README, "Benchmarks"). Holding the matrices as int8 halves the bytes a step
reads against bfloat16 (a quarter against float32). Symmetric, per output channel (absmax
over the axes a product contracts, as LLM.int8 / AQT's weight-only modes do):

    scale = max |w| over the contracted axes / 127        (1 where that max is 0)
    q     = clip(round(w / scale), -127, 127)  as int8
    x @ w ~ (x @ q) * scale                                (q cast to the compute dtype)

The contracted axes are read from a param's logical axes (`spec.logical_axes`), the stacking
axes `layers` and `expert` aside: a matrix whose first axis is `embed` (q, k, v, gate, up, the
LM head) contracts it; the embedding table `[vocab, embed]` contracts `embed` (as the tied LM
head; a row scale for the lookup too); any other (o `[heads, head_dim, embed]`, down
`[mlp, embed]`) contracts every axis but its last. Each weight is off by at most scale / 2.
MoE experts stay in the compute dtype (`KEEP_AXES`).

Only the sampler uses this, for RL rollouts and benchmarks (`config.rl.rollout_weights`,
`scripts.benchmark generate --sample_weights int8`): training keeps its float weights. An RL
policy sampled with int8 weights is a slightly different policy mu from the one trained, pi;
the loop corrects for it as for a stale rollout, with truncated importance weights
min(pi_old / mu, C) (training/rl/offpolicy.py), mu's log-probs computed by the training
forward pass on the same int8 weights.

`Int8Weight` is a pytree (its int8 values and scales are the leaves), so the scanned layer
stack slices it layer by layer like any param. The layers take a matrix through
`layers.matrix`, which passes an Int8Weight on to `layers.dense` (the product with q, the
output scaled: the compiler fuses q's convert into the product, so a decode step reads a byte
per weight; a test checks the TPU program for it). Any other reader gets the dequantized
w' = float32(q) * scale in the compute dtype from `param[...]`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# Param names never quantized: the MoE router runs in float32 (models/moe.py) and the
# untied input tables are only gathered from (a step reads `batch` rows of them).
KEEP = ("router", "pos_embed", "type_embed")
# Matrices stacked along this axis stay in the compute dtype: the MoE experts, whose grouped
# products (jax.lax.ragged_dot) XLA:TPU fed int8 weights by writing a converted copy of every
# layer's experts each step (more bytes than bfloat16 weights; tests/models/test_quantize.py).
KEEP_AXES = ("expert",)
# Logical axes that stack matrices rather than belong to one.
STACK_AXES = ("layers", "expert")
WEIGHT_FORMATS = ("compute", "int8")


def check_format(weights: str, what: str = "sampling weights") -> None:
  """Raises ValueError naming `what` unless `weights` is one of WEIGHT_FORMATS."""
  if weights not in WEIGHT_FORMATS:
    raise ValueError(f"unknown {what} {weights!r}; choose one of {WEIGHT_FORMATS}")



@jax.tree_util.register_pytree_node_class
class Int8Weight:
  """A matrix as int8 `q` and float32 `scale`, flattened to `[*stack, a, b]`.

  The un-stacked axes are grouped into the two a product sees, `a` (the first `split` of
  them) and `b` (the rest), as layers.dense flattens a kernel; the contracted group is `a`
  (`contracted_first`, every projection) or `b` (the embedding table), and `scale` is 1 along
  it. `inner`: the un-stacked shape; the stacked axes are whatever leads `q` (a scan slices
  them off).

  Products (layers.dense, the tied LM head) read `values` (q in the compute dtype, a convert
  the compiler fuses into the product) and multiply the product's output by `output_scale`:
  a per-output-channel scale commutes with the contraction. Scaling the weight instead left
  XLA:TPU writing q, k, v and o out dequantized every decode step (their products want
  another layout than the stored one). Any other reader gets w' from `param[...]`.
  """

  def __init__(self, q: jax.Array, scale: jax.Array, dtype: Any, inner: tuple[int, ...],
               split: int, contracted_first: bool):
    self.q, self.scale, self.dtype = q, scale, jnp.dtype(dtype)
    self.inner, self.split, self.contracted_first = tuple(inner), split, contracted_first

  def tree_flatten(self):
    return (self.q, self.scale), (self.dtype.name, self.inner, self.split,
                                  self.contracted_first)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.q.shape[:-2]) + self.inner

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def values(self, dtype: Any) -> jax.Array:
    """q as `dtype`, in the param's own shape (unscaled)."""
    return self.q.astype(dtype).reshape(self.shape)

  def output_scale(self) -> jax.Array:
    """float32 scales over the product's output axes (the uncontracted ones)."""
    kept = self.inner[self.split:] if self.contracted_first else self.inner[:self.split]
    return self.scale.reshape(*self.q.shape[:-2], *kept)

  def dequantize(self) -> jax.Array:
    """w' in the compute dtype, in the param's own shape."""
    return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype).reshape(self.shape)

  def take_rows(self, index: jax.Array) -> jax.Array:
    """w'[index] of an embedding table (`contracted_first` False, no stacked axes): only the
    rows read are dequantized."""
    rows = jnp.take(self.q, index, axis=0).astype(jnp.float32)
    return (rows * jnp.take(self.scale, index, axis=0)).astype(self.dtype)

  def __getitem__(self, index) -> jax.Array:
    return self.dequantize()[index]

  def astype(self, dtype) -> jax.Array:
    return self.dequantize().astype(dtype)


def concat_outputs(weights: list["Int8Weight"]) -> "Int8Weight":
  """Int8 matrices `[a, b_i]` that contract their first axis (projections of one input) as
  one `[a, sum b_i]` matrix: values and per-output scales side by side."""
  if any(w.q.ndim != 2 or not w.contracted_first or w.split != 1 for w in weights):
    raise ValueError("concat_outputs takes unstacked projections that contract their "
                     "first axis")
  q = jnp.concatenate([w.q for w in weights], axis=1)
  return Int8Weight(q, jnp.concatenate([w.scale for w in weights], axis=1), weights[0].dtype,
                    (q.shape[0], q.shape[1]), 1, True)


def contracted_axes(names: tuple) -> tuple[int, ...]:
  """The axes (indices) of a matrix with logical axes `names` that a product contracts
  (module docstring); () for a vector or a stack of vectors."""
  inner = [i for i, name in enumerate(names) if name not in STACK_AXES]
  if len(inner) < 2:
    return ()
  if names[inner[0]] == "vocab":
    return (inner[-1],)
  if names[inner[0]] == "embed":
    return (inner[0],)
  return tuple(inner[:-1])


def quantize_int8(x: jax.Array, axes: tuple[int, ...], dtype: Any, stacked: int = 0
                  ) -> Int8Weight:
  """`x` as an Int8Weight with one scale per slice over `axes` (module docstring).

  `stacked`: the leading axes that stack matrices; `axes`: the contracted ones, the first or
  the last of the others (as `contracted_axes` gives them).
  """
  inner = x.shape[stacked:]
  axes = tuple(a - stacked for a in sorted(axes))
  leading = axes == tuple(range(len(axes)))
  if not leading and axes != tuple(range(len(inner) - len(axes), len(inner))):
    raise ValueError(f"contracted axes {axes} of a {x.shape} matrix ({stacked} stacked axes) "
                     "are neither its first nor its last")
  split = len(axes) if leading else len(inner) - len(axes)
  flat = x.reshape(*x.shape[:stacked], math.prod(inner[:split]),
                   math.prod(inner[split:])).astype(jnp.float32)
  amax = jnp.max(jnp.abs(flat), axis=stacked if leading else stacked + 1, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(flat / scale), -127, 127).astype(jnp.int8)
  return Int8Weight(q, scale, dtype, inner, split, leading)


def quantize_params(spec, params):
  """`params` with every floating matrix as an Int8Weight, except KEEP and the input
  embedding table when it is not also the LM head (`config.tie_embeddings`)."""
  cfg = spec.config
  tied = cfg.get("tie_embeddings", False)

  def convert(path, x, names):
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    axes = contracted_axes(names)
    if (not axes or not jnp.issubdtype(x.dtype, jnp.floating) or name in KEEP
        or any(axis in KEEP_AXES for axis in names)
        or any(str(getattr(k, "key", k)) in KEEP for k in path)
        or (name == "embed" and len(path) == 1 and not tied)):
      return x
    stacked = next(i for i, n in enumerate(names) if n not in STACK_AXES)
    return quantize_int8(x, axes, cfg.dtype, stacked)
  return jax.tree_util.tree_map_with_path(convert, params, spec.logical_axes)

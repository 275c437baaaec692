"""Logical axis names -> mesh axes.

Parameters and key activations name their dimensions logically (`embed`, `mlp`, `heads`, ...);
a rules table maps each logical name to zero or more mesh axes. Changing the parallelism is a
config change (`config.mesh.rules` and the mesh shape), never a code change.

A logical name with no rule is an error that names the parameter path or activation: nothing is
ever replicated silently because it was renamed.

Every dimension of every parameter must carry a logical name (`None` is allowed only in
activation constraints): a parameter the rules cannot place is an error naming its path.

Parameter names:  vocab, embed, mlp, heads, kv_heads, head_dim, layers (scanned stack),
                  norm (1-D scales and biases), max_length (learned position table),
                  score (the size-1 output of a scalar reward / value head; replicated),
                  lora_rank (the rank dim of LoRA adapters, models/lora.py; replicated),
                  expert (the experts of a mixture-of-experts layer, models/moe.py).
Activation names: batch, length, act_embed, act_mlp, act_heads, act_kv_heads, act_head_dim,
                  act_vocab.
"""

from __future__ import annotations

import contextlib
import math
import contextvars
import traceback
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm",
              "max_length", "score", "lora_rank", "expert")
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_mlp", "act_heads", "act_kv_heads",
                   "act_head_dim", "act_vocab")

Rules = Mapping[str, tuple[str, ...]]

_REPLICATED_PARAMS = dict(vocab=(), embed=(), mlp=(), heads=(), kv_heads=(), head_dim=(),
                          layers=(), norm=(), max_length=(), score=(), lora_rank=(),
                          expert=())
_REPLICATED_ACTS = dict(length=(), act_embed=(), act_mlp=(), act_heads=(), act_kv_heads=(),
                        act_head_dim=(), act_vocab=())

RULE_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Pure data parallelism: every device holds all params; the batch is split over all axes.
    "dp": {**_REPLICATED_PARAMS, **_REPLICATED_ACTS, "batch": ("data", "fsdp", "tensor")},
    # ZeRO-3 style: params and optimizer state sharded over `fsdp` along `embed`, gathered per
    # layer in the forward pass; the batch is split over data and fsdp (and tensor, if any).
    "fsdp": {**_REPLICATED_PARAMS, **_REPLICATED_ACTS, "embed": ("fsdp",),
             "batch": ("data", "fsdp", "tensor")},
    # FSDP over `fsdp` plus Megatron-style tensor parallelism over `tensor`: attention heads and
    # the MLP hidden dimension are split, so each block needs one all-reduce per sub-layer.
    "fsdp_tp": {**_REPLICATED_PARAMS, **_REPLICATED_ACTS,
                "embed": ("fsdp",), "mlp": ("tensor",), "heads": ("tensor",),
                "kv_heads": ("tensor",), "vocab": ("tensor",),
                "act_mlp": ("tensor",), "act_heads": ("tensor",), "act_kv_heads": ("tensor",),
                "act_vocab": ("tensor",), "batch": ("data", "fsdp")},
}
# Expert parallelism for mixture-of-experts models: fsdp_tp, plus the experts of each MoE
# layer split over `data` (params are otherwise replicated over `data`, so the axis is free
# for them): a device stores num_experts / data experts. The grouped matmul gathers the
# experts its tokens need (models/moe.py).
RULE_PRESETS["fsdp_tp_ep"] = {**RULE_PRESETS["fsdp_tp"], "expert": ("data",)}


def get_rules(name: str) -> dict[str, tuple[str, ...]]:
  if name not in RULE_PRESETS:
    raise ValueError(f"unknown logical-axis rules {name!r}; choose one of {sorted(RULE_PRESETS)}")
  return dict(RULE_PRESETS[name])


def logical_to_spec(names: Sequence[str | None], rules: Rules, *, what: str = "",
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """Maps a tuple of logical axis names to a PartitionSpec.

  Args:
    names: one logical name (or None: not sharded) per array dimension.
    rules: logical name -> tuple of mesh axes.
    what: the parameter path or activation, named in errors.
    shape: when given with `mesh`, each sharded dimension must divide evenly.
    mesh: the mesh whose axis sizes are checked.
  """
  spec, used = [], set()
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise KeyError(f"no sharding rule for logical axis {name!r} of {what or 'an array'} "
                     f"(axes {tuple(names)}); add it to the rules in parallel/rules.py")
    axes = tuple(a for a in rules[name] if mesh is None or mesh.shape[a] > 1)
    if used.intersection(axes):
      raise ValueError(f"{what}: mesh axes {axes} used twice in logical axes {tuple(names)}")
    used.update(axes)
    if shape is not None and mesh is not None and axes:
      size = 1
      for a in axes:
        size *= mesh.shape[a]
      if shape[dim] % size:
        raise ValueError(f"{what}: dimension {dim} ({name!r}, size {shape[dim]}) does not divide "
                         f"over mesh axes {axes} of total size {size}")
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_shardings(logical_tree: Any, shapes: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree of parameters' logical-name tuples (leaves) and their shapes.

  Raises:
    ValueError: a parameter dimension has no logical name, or its size does not divide.
    KeyError: a logical name has no rule.
  """
  flat_names, treedef = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=_is_names)
  flat_shapes = treedef.flatten_up_to(shapes)
  out = []
  for (path, names), shape in zip(flat_names, flat_shapes):
    what = f"parameter {jax.tree_util.keystr(path)}"
    shape = tuple(getattr(shape, "shape", shape))
    if len(names) != len(shape):
      raise ValueError(f"{what}: {len(names)} logical axes {names} for shape {shape}")
    if None in names:
      raise ValueError(f"{what} {shape} has no logical axis name for dimension "
                       f"{names.index(None)} (axes {names}); name every dimension where the "
                       "parameter is created so the rules can place it")
    out.append(NamedSharding(mesh, logical_to_spec(names, rules, what=what, shape=shape,
                                                   mesh=mesh)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _format_axes(axes: Sequence[Any]) -> str:
  # None (not sharded / no name) prints as '*'; several mesh axes on one dimension as 'a+b'.
  return "(" + ", ".join("*" if a is None else "+".join(a) if isinstance(a, tuple) else str(a)
                         for a in axes) + ")"


def describe_layout(logical_tree: Any, abstract_tree: Any) -> str:
  """One readable line per array: path, shape, dtype, logical axes, spec, per-device shard.

  Args:
    logical_tree: pytree of logical-name tuples (a `ModelSpec.logical_axes`).
    abstract_tree: matching pytree of arrays or ShapeDtypeStructs with `.sharding` set.
  """
  flat_names, treedef = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=_is_names)
  rows = []
  for (path, names), leaf in zip(flat_names, treedef.flatten_up_to(abstract_tree)):
    spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
    rows.append((".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
                 str(tuple(leaf.shape)), str(leaf.dtype), _format_axes(names), _format_axes(spec),
                 str(tuple(leaf.sharding.shard_shape(leaf.shape)))))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths + [0])).rstrip()
                   for r in rows) + "\n"


# The mesh and rules that activation constraints use while a step is traced.
_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "sharding_context", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Rules):
  """Within this context `constrain` pins activations to `mesh` by `rules`."""
  token = _CONTEXT.set((mesh, rules))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def spec_size(mesh: Mesh, entry: str | Sequence[str] | None) -> int:
  """Devices one PartitionSpec entry (None, a mesh axis or a tuple of them) splits over."""
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[a] for a in axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; identity outside `use_mesh_rules`."""
  context = _CONTEXT.get()
  if context is None:
    return x
  mesh, rules = context
  try:
    spec = logical_to_spec(names, rules, what=f"activation {tuple(x.shape)}", mesh=mesh)
  except KeyError as e:
    # Name where in the model the activation is constrained: the caller of `constrain`.
    caller = traceback.extract_stack(limit=2)[0]
    raise KeyError(f"{e.args[0]} (at {caller.filename}:{caller.lineno})") from None
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of an input batch array `[batch, length, ...]`: batch split, the rest whole."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules,
                                             what="batch", mesh=mesh))

"""Which attention kernel serves a layer, on which platform, and what each cannot serve.

config.model.attention:

  auto        decided when the step is traced, by the platform of the devices it runs on (the
              mesh of the traced step, so a step compiled for a TPU topology on a CPU host gets
              the TPU kernel; without a mesh, `jax.default_backend()`):
                TPU  splash; blockwise where it cannot serve (attention-logit soft-capping)
                GPU  pallas_gpu; blockwise where it cannot serve (sliding window,
                     soft-capping). cudnn is never picked: it takes one document per row,
                     and every stage packs rows.
                CPU  blockwise
  dense       the plain `[q, k]` softmax (models/attention.py `dense_attention`), the reference
  blockwise   models/flash_attention.py: query blocks in plain JAX, skipping key blocks the
              causal mask, the window or the segment ids exclude (any platform)
  splash      models/splash_attention.py: the Pallas TPU kernel (TPU)
  cudnn       models/gpu_attention.py: cuDNN fused attention, rows of one document (GPU)
  pallas_gpu  models/gpu_attention.py: the Pallas Triton kernel with segment ids (GPU)

Decoding (one new token per row over a KV cache) is apart: on GPUs it runs
models/decode_attention.py's kernel where it can (`decode_kernel`; under a mesh, on each
device's rows and heads, `decode_per_device`), elsewhere the XLA form of models/kv_cache.py;
config.model.attention does not choose it.

A forced kernel that cannot serve the configuration fails before anything is built: training
validation (training/validate.py) reports `kernel_problems`, one line naming
config.model.attention; the same check raises when a step is traced by any other entry point.

Under a mesh, the Pallas and cuDNN kernels are custom calls that the SPMD partitioner cannot
split, so `run_per_device` runs them inside `shard_map` over the mesh axes of the `batch` and
attention-heads logical axes (parallel/rules.py): each device attends its own rows and heads,
and no activation is gathered.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
from jax.sharding import PartitionSpec as P

from models import decode_attention, gpu_attention
from parallel import rules as rules_lib

KERNELS = ("auto", "dense", "blockwise", "splash", "cudnn", "pallas_gpu")
# The platform each hardware kernel runs on (interpret mode aside).
KERNEL_PLATFORM = {"splash": "tpu", "cudnn": "gpu", "pallas_gpu": "gpu"}
ROWS_PROBLEM = ("jax.nn.dot_product_attention's cuDNN path takes one document per row "
                "(per-row lengths, no segment ids) and every training stage packs several "
                "documents or sequences per row; use 'pallas_gpu' or 'auto'")


@dataclasses.dataclass(frozen=True)
class Layer:
  """What a kernel must serve in one attention layer (all static)."""
  causal: bool
  window: int
  head_dim: int
  dtype: str
  kernel_block: int
  softcap: float = 0.0   # attention-logit soft-capping (Gemma 2); 0: none


def layer_of(cfg: ml_collections.ConfigDict, *, causal: bool) -> Layer:
  """The `Layer` of model config `cfg` (a decoder's layers are causal, an encoder's not)."""
  return Layer(causal=causal, window=int(cfg.get("sliding_window", 0) or 0),
               head_dim=int(cfg.head_dim or cfg.d_model // cfg.num_heads), dtype=str(cfg.dtype),
               kernel_block=int(cfg.get("attention_kernel_block", 0) or 0),
               softcap=float(cfg.get("attn_softcap", 0.0) or 0.0))


def _hopper_or_later() -> bool:
  """Whether the local GPUs are compute capability 9.0+ (True off a GPU: checked there)."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return True
  major = str(getattr(device, "compute_capability", "9.0")).split(".", maxsplit=1)[0]
  return int(major) >= 9


def kernel_problem(name: str, layer: Layer, platform: str) -> str | None:
  """Why kernel `name` (not 'auto') cannot serve `layer` on `platform` (None: it can)."""
  if name not in KERNELS:
    return f"unknown {name!r} ({' | '.join(KERNELS)})"
  wanted = KERNEL_PLATFORM.get(name)
  if wanted and platform != wanted:
    return f"{name!r} runs on {wanted.upper()}; this run's devices are {platform.upper()}"
  if layer.softcap and wanted:
    return (f"{name!r} does not soft-cap attention logits (config.model.attn_softcap "
            f"{layer.softcap:g}); use 'blockwise', 'dense' or 'auto'")
  block = layer.kernel_block
  if name in ("splash", "pallas_gpu") and block and (block < 128 or block & (block - 1)):
    return f"config.model.attention_kernel_block must be 0 or a power of two >= 128, got {block}"
  if name == "cudnn":
    return gpu_attention.cudnn_problem(dtype=layer.dtype, head_dim=layer.head_dim,
                                       causal=layer.causal, window=layer.window,
                                       hopper=_hopper_or_later())
  if name == "pallas_gpu":
    return gpu_attention.pallas_gpu_problem(head_dim=layer.head_dim, window=layer.window)
  return None


def resolve_kernel(name: str, layer: Layer, platform: str) -> str:
  """The kernel that serves `layer` on `platform` for config.model.attention `name`.

  Raises:
    ValueError: `name` is unknown, or a forced kernel cannot serve the layer.
  """
  if name == "auto":
    if platform == "tpu" and kernel_problem("splash", layer, platform) is None:
      return "splash"
    if platform == "gpu" and kernel_problem("pallas_gpu", layer, platform) is None:
      return "pallas_gpu"
    return "blockwise"
  problem = kernel_problem(name, layer, platform)
  if problem:
    raise ValueError(f"config.model.attention {name!r}: {problem}")
  return name


def kernel_problems(model_cfg: ml_collections.ConfigDict, *, causal: bool,
                    platform: str) -> list[str]:
  """Config-time check of config.model.attention for a training stage (packed rows).

  Args:
    model_cfg: config.model.
    causal: the stage trains a decoder (False: a bidirectional encoder).
    platform: the platform of the run's devices ('cpu', 'gpu', 'tpu').
  Returns:
    One line per problem, each naming config.model.attention; empty: none.
  """
  name = model_cfg.get("attention", "auto")
  layer = layer_of(model_cfg, causal=causal)
  problem = kernel_problem(name, layer, platform) if name != "auto" else None
  if name == "cudnn" and problem is None:
    problem = ROWS_PROBLEM
  return [f"config.model.attention {name!r}: {problem}"] if problem else []


def step_platform() -> str:
  """The platform a step being traced runs on: its mesh's devices (`use_mesh_rules`), else
  JAX's default backend."""
  context = rules_lib._CONTEXT.get()  # pylint: disable=protected-access
  if context is not None:
    return context[0].devices.flat[0].platform
  return jax.default_backend()


def decode_local_shape(*, batch: int, heads: int, kv_heads: int
                       ) -> tuple[int, int, int] | None:
  """Each device's `(rows, heads, kv_heads)` of a decode step's attention under the traced
  step's mesh (the whole problem without one), or None when the kernel cannot run per device:
  query and key heads split over different mesh axes (query head i would not meet key head
  i // groups on its device), the cache's slots or head_dim split, or a split that does not
  divide. The cache is sharded by models/kv_cache.py's logical axes (`KV_AXES`)."""
  context = rules_lib._CONTEXT.get()  # pylint: disable=protected-access
  if context is None or context[0].size == 1:
    return batch, heads, kv_heads
  mesh, rules = context
  spec = lambda name: rules_lib.logical_to_spec((name,), rules, what="decode attention",
                                                mesh=mesh)[0]
  rows, q_heads, k_heads = spec("batch"), spec("act_heads"), spec("act_kv_heads")
  if q_heads != k_heads or spec("length") is not None or spec("act_head_dim") is not None:
    return None
  split = [rules_lib.spec_size(mesh, e) for e in (rows, q_heads, k_heads)]
  whole = (batch, heads, kv_heads)
  if any(n % k for n, k in zip(whole, split)):
    return None
  return tuple(n // k for n, k in zip(whole, split))


def decode_kernel(*, head_dim: int, heads: int, kv_heads: int, cache_len: int,
                  batch: int, joined: bool = False) -> bool:
  """Whether a decode step (one new token per row) traced now attends over its KV cache with
  models/decode_attention.py's kernel (`joined`: its form that takes the joined q / k / v
  projection): on a GPU, each device's share of the rows and heads (`decode_local_shape`)
  within the kernel's constraints; else with the XLA form (models/kv_cache.py `attend`)."""
  return step_platform() == "gpu" and decode_kernel_fits(
      head_dim=head_dim, heads=heads, kv_heads=kv_heads, cache_len=cache_len, batch=batch,
      joined=joined)


def decode_kernel_fits(*, head_dim: int, heads: int, kv_heads: int, cache_len: int,
                       batch: int, joined: bool = False) -> bool:
  """`decode_kernel` on any platform: the per-device problem is one the kernel serves (the
  joined form also needs every head on each device: its columns are the whole projection)."""
  local = decode_local_shape(batch=batch, heads=heads, kv_heads=kv_heads)
  return (local is not None and not (joined and local[1] != heads)
          and decode_attention.problem(head_dim=head_dim, heads=local[1], kv_heads=local[2],
                                       cache_len=cache_len, joined=joined) is None)


def decode_per_device(kernel: Callable[..., Any], args: Sequence[jax.Array],
                      in_axes: Sequence[tuple], out_axes: tuple | list[tuple]) -> Any:
  """`kernel(*args)` (a models/decode_attention.py call) on each device's share of the traced
  step's mesh: every array split by its logical axis names (`in_axes`, one tuple a
  argument; `out_axes`, one tuple, or a list of them for several outputs), as
  parallel/rules.py splits the arrays themselves. `decode_local_shape` has checked that the
  split gives each device whole key heads with their query heads and every cache slot. Each
  device reads its own shard of the cache in place; nothing is gathered. Without a mesh (or
  on one device): a plain call."""
  context = rules_lib._CONTEXT.get()  # pylint: disable=protected-access
  if context is None or context[0].size == 1:
    return kernel(*args)
  mesh, rules = context
  spec = lambda names: rules_lib.logical_to_spec(names, rules, what="decode attention",
                                                 mesh=mesh)
  out_specs = (tuple(spec(n) for n in out_axes) if isinstance(out_axes, list)
               else spec(out_axes))
  return jax.shard_map(kernel, mesh=mesh, in_specs=tuple(spec(n) for n in in_axes),
                       out_specs=out_specs, check_vma=False)(*args)


Kernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def run_per_device(kernel: Kernel, q: jax.Array, k: jax.Array, v: jax.Array,
                   segment_ids: jax.Array) -> jax.Array:
  """`kernel(q, k, v, segment_ids)` on each device's rows and heads of the traced step's mesh.

  q `[batch, length, heads, head_dim]`, k / v `[batch, length, kv_heads, head_dim]`, segment
  ids `[batch, length]`; the rows split like the `batch` logical axis, the heads like
  `act_heads` when the key heads split the same way (so query head i still meets key head
  i // groups on its device), else only the rows. Without a mesh (or on one device): a plain
  call.
  """
  context = rules_lib._CONTEXT.get()  # pylint: disable=protected-access
  if context is None or context[0].size == 1:
    return kernel(q, k, v, segment_ids)
  mesh, rules = context
  spec = lambda name: rules_lib.logical_to_spec((name,), rules, what="attention",
                                                mesh=mesh)[0]
  batch, heads, kv_heads = spec("batch"), spec("act_heads"), spec("act_kv_heads")
  if heads != kv_heads:
    heads = kv_heads = None
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)

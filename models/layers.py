"""Building blocks shared by the decoder and the encoder: norms, rotary positions, MLPs.

Every parameter carries logical axis names (`sharding_names`) that parallel/rules.py maps onto
the mesh. Params are stored in `param_dtype`; compute runs in `dtype`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models import decode_gemm
from models.quantize import Int8Weight, concat_outputs
from parallel.rules import constrain


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, init, shape, names, param_dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=names)


def dense(x: jax.Array, kernel: jax.Array, in_dims: int = 1, **dot_kwargs) -> jax.Array:
  """`x [..., *in] @ kernel [*in, *out] -> [..., *out]` as one 2-D `[tokens, in] @ [in, out]`.

  Same math as the einsum; the flattening is for speed. Differentiating a 3-D einsum such as
  "bld,df->blf" gives weight gradients that contract over (batch, length); XLA:CPU lays those
  out by fusing a transpose into the elementwise producer of the gradient (SiLU', the softmax
  of the loss), which then runs far below memory speed. With 2-D operands every forward and
  backward product is a plain GEMM on row-major operands (README, "Benchmarks", has the
  speed-up). In a decode step that asked for it, the product runs as models/decode_gemm.py's
  kernel where that serves it.
  """
  if isinstance(kernel, Int8Weight):
    if kernel.contracted_first and kernel.split == in_dims:
      # (x @ q) * scale: one scale per output feature (models/quantize.py).
      out_dtype = dot_kwargs.pop("preferred_element_type", x.dtype)
      if kernel.q.ndim == 2 and not dot_kwargs:
        y = _decode_product(x, kernel.q, kernel.output_scale(), in_dims,
                            kernel.shape[in_dims:], out_dtype)
        if y is not None:
          return y
      y = dense(x, kernel.values(x.dtype), in_dims, preferred_element_type=jnp.float32,
                **dot_kwargs)
      return (y * kernel.output_scale()).astype(out_dtype)
    kernel = kernel.dequantize()
  in_shape, out_shape = kernel.shape[:in_dims], kernel.shape[in_dims:]
  w2 = kernel.reshape(math.prod(in_shape), -1)
  if set(dot_kwargs) <= {"preferred_element_type"}:
    y = _decode_product(x, w2, None, in_dims, out_shape,
                        dot_kwargs.get("preferred_element_type", x.dtype))
    if y is not None:
      return y
  lead = x.shape[:x.ndim - in_dims]
  x2 = x.reshape(-1, math.prod(in_shape))
  y = jnp.dot(x2, w2, **dot_kwargs)
  return y.reshape(*lead, *out_shape)


def _decode_product(x: jax.Array, w2: jax.Array, scale: jax.Array | None, in_dims: int,
                    out_shape: tuple[int, ...], out_dtype) -> jax.Array | None:
  """`x @ w2` (`[in, out]` flattened, times `scale` per output) by models/decode_gemm.py's
  kernel, or None where it does not serve the product (the caller multiplies with XLA)."""
  if not decode_gemm.active():
    return None
  lead = x.shape[:x.ndim - in_dims]
  y = decode_gemm.maybe_dot(x.reshape(-1, w2.shape[0]), w2, scale, out_dtype=out_dtype)
  return None if y is None else y.reshape(*lead, *out_shape)


def matrix(param: nnx.Variable, dtype) -> jax.Array | Int8Weight:
  """A matrix param for `dense`: its value cast to `dtype`, or an int8 weight as it is
  (sampling, models/quantize.py), which `dense` multiplies as int8 and scales."""
  value = param.get_value()
  return value if isinstance(value, Int8Weight) else value.astype(dtype)


def join_outputs(kernels: list[jax.Array | Int8Weight]) -> jax.Array | Int8Weight:
  """Projections of one input `[d, *out_i]` (as `matrix` gives them) as one `[d, sum out_i]`
  matrix, so `dense` runs one GEMM for all of them (sampling: models/decoder.py
  `BlockStack.unroll`)."""
  if all(isinstance(k, Int8Weight) for k in kernels):
    return concat_outputs(kernels)
  if any(isinstance(k, Int8Weight) for k in kernels):
    raise ValueError("join_outputs: int8 and float kernels mixed")
  return jnp.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=1)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (Zhang & Sennrich, 2019).

  With `config.model.norm_plus_one` (Gemma) the factor is (1 + scale) and scale starts at 0:
  the weights are stored as Gemma stores them, so conversion copies them exactly.
  """

  def __init__(self, dim: int, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.dtype = dtype_of(cfg.dtype)
    self.plus_one = bool(cfg.get("norm_plus_one", False))
    init = nnx.initializers.zeros if self.plus_one else nnx.initializers.ones
    self.scale = param(rngs, init, (dim,), ("norm",), dtype_of(cfg.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm with scale and bias, statistics in float32 (Ba et al., 2016)."""

  def __init__(self, dim: int, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.dtype = dtype_of(cfg.dtype)
    pdt = dtype_of(cfg.param_dtype)
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), pdt)
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def make_norm(dim: int, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.norm == "rmsnorm":
    return RMSNorm(dim, cfg, rngs=rngs)
  if cfg.norm == "layernorm":
    return LayerNorm(dim, cfg, rngs=rngs)
  raise ValueError(f"config.model.norm: unknown norm {cfg.norm!r} (rmsnorm | layernorm)")


RopeScaling = tuple[str, float, float, float, float] | None


def rope_scaling_of(cfg: ml_collections.ConfigDict) -> RopeScaling:
  """`config.model.rope_scaling` as a hashable (type, factor, low_freq_factor,
  high_freq_factor, original_max_length) tuple, or None when off (or absent in older configs)."""
  scaling = cfg.get("rope_scaling")
  if scaling is None or scaling.type == "none":
    return None
  if scaling.type not in ("linear", "llama3"):
    raise ValueError(f"config.model.rope_scaling.type: unknown {scaling.type!r} "
                     "(none | linear | llama3)")
  return (scaling.type, float(scaling.factor), float(scaling.low_freq_factor),
          float(scaling.high_freq_factor), float(scaling.original_max_length))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling = None) -> jax.Array:
  """Rotary inverse frequencies `[head_dim // 2]`, optionally rescaled for long context.

  'linear' divides every frequency by `factor` (position interpolation, Chen et al., 2023).
  'llama3' (Llama 3.1, Meta 2024) keeps wavelengths shorter than
  `original_max_length / high_freq_factor`, divides those longer than
  `original_max_length / low_freq_factor` by `factor`, and interpolates smoothly between.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  kind, factor, low, high, original = scaling
  if kind == "linear":
    return inv_freq / factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling = None) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables `[batch, length, head_dim // 2]` for rotary embeddings (Su et al., 2021)."""
  inv_freq = rope_inv_freq(head_dim, theta, scaling)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x [batch, length, heads, head_dim]` in the half-split (LLaMA / HF) layout."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU (Shazeer, 2020): down(silu(gate x) * up x); GeGLU (same paper; Gemma):
  down(gelu(gate x) * up x); or GELU: down(gelu(up x))."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    pdt = dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    self.activation = cfg.activation
    self.gelu_approximate = cfg.get("gelu_approximate", True)  # False: exact erf GELU (BERT)
    if cfg.activation not in ("swiglu", "geglu", "gelu"):
      raise ValueError(f"config.model.activation: unknown {cfg.activation!r} "
                       "(swiglu | geglu | gelu)")
    self.gated = cfg.activation in ("swiglu", "geglu")
    init = nnx.initializers.normal(cfg.init_std)
    # Output projections scaled by 1/sqrt(2 * layers) so the residual stream's variance does not
    # grow with depth (GPT-2, Radford et al., 2019).
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    if self.gated:
      self.gate = param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    self.up = param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    self.down = param(rngs, out_init, (f, d), ("mlp", "embed"), pdt)
    self.use_bias = cfg.mlp_bias
    if cfg.mlp_bias:
      if self.gated:
        self.gate_bias = param(rngs, nnx.initializers.zeros, (f,), ("mlp",), pdt)
      self.up_bias = param(rngs, nnx.initializers.zeros, (f,), ("mlp",), pdt)
      self.down_bias = param(rngs, nnx.initializers.zeros, (d,), ("norm",), pdt)

  def _dense(self, x, kernel, bias=None):
    y = dense(x, matrix(kernel, self.dtype) if isinstance(kernel, nnx.Variable) else kernel)
    return y if bias is None else y + bias[...].astype(self.dtype)

  def joined_kernel(self) -> jax.Array | Int8Weight | None:
    """gate and up as one `[d, 2 * mlp]` matrix (`join_outputs`), for `use_joined`; None
    without a gate."""
    if not self.gated:
      return None
    return join_outputs([matrix(self.gate, self.dtype), matrix(self.up, self.dtype)])

  def use_joined(self, kernel: jax.Array | Int8Weight) -> None:
    """Sampling: compute gate and up by one product with `joined_kernel()`'s matrix, made
    once outside the decode loop (models/decoder.py `BlockStack.unroll`)."""
    self.joined = nnx.data(kernel)

  def _gate_up(self, x, bias):
    joined = getattr(self, "joined", None)
    if joined is None:
      return (self._dense(x, self.gate, bias("gate_bias")),
              self._dense(x, self.up, bias("up_bias")))
    gate, up = jnp.split(self._dense(x, joined), 2, axis=-1)
    add = lambda y, b: y if b is None else y + b[...].astype(self.dtype)
    return add(gate, bias("gate_bias")), add(up, bias("up_bias"))

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = lambda name: getattr(self, name) if self.use_bias else None
    if self.gated:
      gate, up = self._gate_up(x, bias)
    else:
      up = self._dense(x, self.up, bias("up_bias"))
    if self.activation == "swiglu":
      hidden = jax.nn.silu(gate) * up
    elif self.activation == "geglu":
      hidden = jax.nn.gelu(gate, approximate=self.gelu_approximate) * up
    else:
      hidden = jax.nn.gelu(up, approximate=self.gelu_approximate)
    hidden = constrain(hidden, ("batch", "length", "act_mlp"))
    return self._dense(hidden, self.down, bias("down_bias"))

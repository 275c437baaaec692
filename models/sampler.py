"""Autoregressive sampling with a KV cache: one prefill pass, then a jitted decode loop.

    prompts (left-padded to a bucketed length P) --prefill--> cache + logits of the last token
    sample token 0; while step < max_new_tokens and some row is not done:
        feed the last token (slot P + step - 1) --decode--> logits; sample the next token

Each row's positions count from its first real token and its padding has segment id 0, so a
left-padded row generates exactly what it generates alone. The whole loop is one
`jax.lax.while_loop` inside one jitted function (no Python per token); it ends when every row
has emitted `eos_id` or one of `stop_ids`, or after `max_new_tokens`.

Sampling: `temperature == 0` is greedy (argmax); otherwise the logits are divided by the
temperature, cut to the `top_k` largest (0: all) and to the smallest set whose probability
reaches `top_p` (nucleus sampling, Holtzman et al., 2020; 1.0: all), and sampled.

Weights: before the prefill the sampler casts every matrix to the compute dtype once
(`compute_dtype_params`), so a decode step, bound by memory bandwidth, reads bfloat16 weights,
not float32 ones it would cast again: bit-identical, since every layer casts them anyway
(vectors and the MoE router, used in float32, stay as stored). `weights="int8"` holds them as
weight-only int8 (models/quantize.py): half the bytes again, a slightly different model.

Compiled without XLA's dot merger (`SAMPLER_COMPILER_OPTIONS`): it joins matrix products
that share an input into one, which inside the decode loop means concatenating each layer's
gate and up (and q, k, v) weights into a new buffer every step. Decoding reads each weight
once per step, so that copy is pure memory traffic: on an H200 it was a third of the 1B
decode step (README, "Benchmarks").

On GPU the decode steps run the layers unrolled (`make_sampler`'s `unroll`). A scanned layer
loop slices each layer's weights out of the stacked array every step, and XLA:GPU copies every
such slice into a new buffer before its GEMM reads it (cuBLAS and Triton read whole buffers):
compiled for an H200, the 1B model's scanned decode step runs 518 kernels moving 4.9 GiB for
1.95 GiB of weights and cache; unrolled, with the slices taken once per call before the loop,
307 kernels moving 2.05 GiB, 259 with each layer's q / k / v and gate / up products joined
(their kernels concatenated once per call), 195 with attention as one kernel a layer
(models/decode_attention.py, which reads its layer of the stacked cache in place; the GPU
sampler allocates the cache in whole blocks of it), 147 with that kernel taking the joined
projection and applying RoPE itself (scripts/decode_check.py reads these figures). With int8
weights the GPU sampler also turns XLA's Triton GEMMs back on (`GPU_INT8_COMPILER_OPTIONS`),
which read int8 weights in the kernel. `gemm="pallas"` runs the decode steps' products as
models/decode_gemm.py's kernel instead (each device's rows, data-parallel).
XLA:TPU reads a layer's slice in place, so TPU (and CPU) keep the scan and its short compile.

Log-probs: `log_probs[b, t] = log softmax(logits)[token]` of the *unmodified* model distribution
(temperature 1, no top-k / top-p cut), i.e. what a training forward pass over the same tokens
gives: the behaviour log-probs RL objectives need, whatever the sampling settings.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import decode_gemm, kv_cache
from models.decode_attention import cache_length
from models.decoder import unroll_layers
from models.quantize import Int8Weight, check_format, quantize_params
from models.build import ModelSpec, Params
from parallel.rules import Rules, batch_sharding, constrain, logical_to_spec, use_mesh_rules

PROMPT_BUCKET = 64
# XLA debug options the sampler is compiled with (module docstring).
SAMPLER_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "dot-merger"}
# Added on GPU with int8 weights: XLA's Triton GEMMs, which read the int8 weights and convert
# them in the kernel. cuBLAS (parallel/xla_settings.py turns Triton GEMMs off) takes no int8 x
# bfloat16 product, so XLA would first write every weight out converted, each step.
GPU_INT8_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": True}
# Matrices that a layer uses in float32 rather than the compute dtype (models/moe.py's router).
FULL_PRECISION_PARAMS = ("router",)


class SampleOutput(NamedTuple):
  """Numpy arrays; `[batch, max_new_tokens]` unless noted.

  tokens: int32 sampled tokens, `pad_id` after a row stopped.
  log_probs: float32 log-prob of each token under the model's unmodified (temperature-1)
    distribution; 0 where `mask` is 0.
  mask: float32, 1 for generated tokens (the stop / EOS token included), 0 after.
  lengths: `[batch]` int32, tokens generated per row (= mask.sum(-1)).
  """
  tokens: np.ndarray
  log_probs: np.ndarray
  mask: np.ndarray
  lengths: np.ndarray


def check_settings(temperature: float, top_k: int, top_p: float) -> None:
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                     f"temperature {temperature}, top_k {top_k}, top_p {top_p}")


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Draws one token per row from float32 `logits [batch, vocab]` -> `[batch]` int32.

  `temperature == 0` is greedy. Tokens tied with the k-th largest logit (or with the last
  logit inside the nucleus) are kept too.
  """
  check_settings(temperature, top_k, top_p)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the probability of the tokens ranked above it is below top_p: the
    # most likely token is always kept.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
    logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (tokens `[batch, length]` int32 left-padded with `pad_id`, lengths `[batch]`)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  lengths = np.array([len(p) for p in prompts], np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, length - len(prompt):] = prompt
  return tokens, lengths


def prompt_inputs(tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positions, segment_ids) `[batch, length]` of left-padded prompts: positions count from
  each row's first real token (0 on padding), segment 1 on real tokens and 0 on padding."""
  pad = tokens.shape[1] - lengths[:, None]
  slot = jnp.arange(tokens.shape[1])[None, :]
  real = slot >= pad
  return jnp.where(real, slot - pad, 0).astype(jnp.int32), real.astype(jnp.int32)


def compute_dtype_params(spec: ModelSpec, params: Params) -> Params:
  """`params` with every floating matrix wider than the compute dtype cast to it, except
  FULL_PRECISION_PARAMS.

  A matrix: a param with two or more axes besides the scanned stack's `layers` axis (read from
  `spec.logical_axes`), so a stacked norm scale `[layers, dim]` stays a vector. The layers cast
  these matrices to the compute dtype before every use, so a model bound to the result computes
  exactly what it computes from `params`, reading half the bytes per step from float32 storage
  (module doc). Vectors (norm scales, biases) are kept: norms use them in float32.
  """
  dtype = jnp.dtype(spec.config.dtype)

  def cast(path, x, names):
    keys = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    if (len([n for n in names if n != "layers"]) < 2
        or not jnp.issubdtype(x.dtype, jnp.floating)
        or jnp.finfo(x.dtype).bits <= jnp.finfo(dtype).bits
        or any(key in FULL_PRECISION_PARAMS for key in keys)):
      return x
    return x.astype(dtype)
  # The axes tree matches `params` down to each param, where it holds a tuple of names.
  return jax.tree_util.tree_map_with_path(cast, params, spec.logical_axes)


def sampling_params(spec: ModelSpec, params: Params, weights: str = "compute") -> Params:
  """The weights a sampler reads: `compute_dtype_params`, or with `weights="int8"` every
  matrix but the untied input tables and the router as models/quantize.py's Int8Weight."""
  check_format(weights)
  held = compute_dtype_params(spec, params)
  if weights == "compute":
    return held
  is_int8 = lambda x: isinstance(x, Int8Weight)
  return jax.tree.map(lambda q, h: q if is_int8(q) else h, quantize_params(spec, params),
                      held, is_leaf=is_int8)


def sampler_platform(mesh=None) -> str:
  """The platform a sampler on `mesh` (None: the default devices) compiles for."""
  return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def unrolls_decode(mesh=None, unroll: bool | None = None) -> bool:
  """Whether `make_sampler(..., mesh=mesh, unroll=unroll)` runs its decode steps unrolled."""
  return sampler_platform(mesh) == "gpu" if unroll is None else unroll


def make_sampler(spec: ModelSpec, *, max_new_tokens: int, eos_id: int, pad_id: int = 0,
                 stop_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, mesh=None, rules: Rules | None = None,
                 weights: str = "compute", unroll: bool | None = None, gemm: str = "xla"
                 ) -> Callable[..., dict[str, jax.Array]]:
  """A jitted `sample(params, prompt_tokens, prompt_lengths, rng) -> dict` for RL loops.

  Args of the returned function:
    params: the model's params (any sharding; sharded params stay where they are).
    prompt_tokens: `[batch, prompt_len]` int32, left-padded (see `left_pad`); every row holds
      at least one real token. Each new `prompt_len` or batch size compiles once.
    prompt_lengths: `[batch]` int32 real tokens per row.
    rng: PRNG key (unused when greedy).
  Returns of the returned function: a dict of device arrays `tokens`, `log_probs`, `mask`,
  `lengths` as in `SampleOutput`.

  With `mesh` and `rules` the computation is traced under `use_mesh_rules`, so activations and
  the cache are sharded like training's (batch over the data axes, heads over `tensor`); the
  batch must then divide over the mesh axes that `batch` maps to.

  `weights`: "compute" (every matrix in the compute dtype) or "int8" (weight-only int8,
  models/quantize.py; the log-probs are then those of the quantized model).

  `unroll`: run the decode steps with the layers unrolled, each layer's weights sliced out of
  a scanned stack once per call, after the prefill from weights held anew (so the slices do
  not add to its stacked copy), its q / k / v and gate / up joined unless the rules shard
  heads or the MLP dimension (models/decoder.py `BlockStack.unroll`). None: on GPU only
  (module doc). Same tokens either way; compile 11 s against 8 (1B, H200).

  `gemm`: the decode steps' products, "xla" or "pallas" (GPU: models/decode_gemm.py).
  """
  check_format(weights)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if (mesh is None) != (rules is None):
    raise ValueError("pass both mesh and rules, or neither")
  check_settings(temperature, top_k, top_p)
  sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  stops = np.asarray(sorted({int(eos_id), *map(int, stop_ids)}), np.int32)
  cfg = spec.config
  platform = sampler_platform(mesh)
  decode_gemm.check_gemm(gemm, platform)
  unroll = unrolls_decode(mesh, unroll)
  # Unrolled, each layer's q / k / v and gate / up also run as one product each, unless the
  # rules split heads or the MLP dimension over the mesh (`BlockStack.unroll`).
  join = unroll and (mesh is None or all(
      mesh.shape[axis] == 1 for name in ("heads", "kv_heads", "mlp")
      for axis in rules.get(name, ())))
  options = dict(SAMPLER_COMPILER_OPTIONS)
  if platform == "gpu" and weights == "int8":
    options.update(GPU_INT8_COMPILER_OPTIONS)

  def draw(logits, rng, step):
    """(token, unmodified log-prob, is_stop) for logits `[batch, vocab]`."""
    logits = constrain(logits.astype(jnp.float32), ("batch", "act_vocab"))
    token = sample_logits(logits, jax.random.fold_in(rng, step), **sample_kw)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None],
                                   axis=-1)[:, 0]
    return token, log_prob, jnp.isin(token, stops)

  def sample(params: Params, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array) -> dict[str, jax.Array]:
    model = spec.bind(sampling_params(spec, params, weights))
    batch, prompt_len = prompt_tokens.shape
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    positions, segment_ids = prompt_inputs(prompt_tokens, prompt_lengths)
    # On GPU, whole blocks of the decode-attention kernel (models/decode_attention.py); the
    # extra slots stay empty (segment 0).
    cache_len = prompt_len + max_new_tokens - 1
    cache = kv_cache.init_cache(cfg, batch, cache_length(cache_len) if platform == "gpu"
                                else cache_len)
    hidden, cache = model.hidden_states(prompt_tokens, positions=positions,
                                        segment_ids=segment_ids, cache=cache)
    token, log_prob, stop = draw(model.logits(hidden[:, -1:])[:, 0], rng, 0)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    log_probs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(log_prob)
    mask = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(1.0)
    if unroll:
      # The decode steps run the layers unrolled, each from its own arrays, sliced here from
      # the weights held anew after the prefill (the barrier orders it): the prefill's stacked
      # copy is then dead before the slices are made, and the two never take memory together.
      _, after_prefill = jax.lax.optimization_barrier((hidden, params))
      model = spec.bind(sampling_params(spec, after_prefill, weights))
      unroll_layers(model, join=join)

    def cond(state):
      step, _, _, done, *_ = state
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
      step, cache, last, done, tokens, log_probs, mask = state
      # The previous token sits at position length + step - 1 of its row.
      pos = (prompt_lengths + step - 1)[:, None]
      with decode_gemm.products(gemm == "pallas", interpret=platform != "gpu"):
        logits, cache = model(last[:, None], positions=pos,
                              segment_ids=jnp.ones_like(pos), cache=cache)
      token, log_prob, stop = draw(logits[:, 0], rng, step)
      live = ~done
      token = jnp.where(live, token, pad_id)
      tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
      log_probs = jax.lax.dynamic_update_slice(
          log_probs, jnp.where(live, log_prob, 0.0)[:, None], (0, step))
      mask = jax.lax.dynamic_update_slice(mask, live.astype(jnp.float32)[:, None], (0, step))
      return step + 1, cache, token, done | (live & stop), tokens, log_probs, mask

    state = (jnp.int32(1), cache, token, stop, tokens, log_probs, mask)
    _, _, _, _, tokens, log_probs, mask = jax.lax.while_loop(cond, body, state)
    return dict(tokens=tokens, log_probs=log_probs, mask=mask,
                lengths=mask.sum(-1).astype(jnp.int32))

  if mesh is None:
    return jax.jit(sample, compiler_options=options)

  def sharded_sample(*args):
    with use_mesh_rules(mesh, rules):
      return sample(*args)
  return jax.jit(sharded_sample, compiler_options=options)


def check_length(spec: ModelSpec, prompt_len: int, max_new_tokens: int) -> None:
  """Learned position tables end at `config.model.max_length`: prompt + new tokens must fit."""
  cfg = spec.config
  if cfg.position == "learned" and prompt_len + max_new_tokens > cfg.max_length:
    raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds "
                     f"config.model.max_length {cfg.max_length} (learned positions)")


class Sampler:
  """Generation with one model on one mesh; owns its compiled samplers.

  `generate` called in a loop (an evaluation every N steps, a file of prompts) compiles once
  per prompt bucket, batch size and setting, then reuses the compiled function: build one
  Sampler per model and keep it for the run.
  """

  def __init__(self, spec: ModelSpec, mesh=None, rules: Rules | None = None,
               weights: str = "compute", gemm: str = "xla"):
    """`weights`, `gemm`: as `make_sampler`'s, for every call."""
    if (mesh is None) != (rules is None):
      raise ValueError("pass both mesh and rules, or neither")
    check_format(weights)
    decode_gemm.check_gemm(gemm, sampler_platform(mesh))
    self.spec, self.mesh, self.rules, self.weights = spec, mesh, rules, weights
    self.gemm = gemm
    self._compiled: dict[tuple, Callable] = {}

  def _sampler(self, **settings) -> Callable:
    key = tuple(sorted(settings.items()))
    if key not in self._compiled:
      self._compiled[key] = make_sampler(self.spec, mesh=self.mesh, rules=self.rules,
                                         weights=self.weights, gemm=self.gemm, **settings)
    return self._compiled[key]

  def generate(self, params: Params, prompts: list[list[int]], *, max_new_tokens: int,
               eos_id: int, pad_id: int = 0, stop_ids: Sequence[int] = (),
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               rng: jax.Array | None = None, prompt_bucket: int = PROMPT_BUCKET
               ) -> SampleOutput:
    """Continues each prompt by up to `max_new_tokens` tokens.

    Args:
      params: the model's params, plain or sharded on the sampler's mesh.
      prompts: token ids per prompt (each non-empty; BOS included if the model expects one).
      max_new_tokens: tokens generated per row at most.
      eos_id: a row stops after emitting it (the token itself is kept, mask 1).
      pad_id: fills the prompt padding and `tokens` after a row stopped.
      stop_ids: more tokens that end a row like `eos_id` (e.g. a chat end-of-turn symbol).
      temperature: 0 is greedy; else sampling temperature (see the module docstring).
      top_k: keep the k most likely tokens (0: all).
      top_p: nucleus probability mass (1.0: all).
      rng: PRNG key; None uses `PRNGKey(0)`.
      prompt_bucket: prompts are left-padded to a multiple of this, so nearby lengths share
        one compiled sampler.
    Returns:
      `SampleOutput` of numpy arrays (see there); `log_probs` are temperature-1 log-probs.
    Raises:
      ValueError: an empty prompt, or (learned positions) a prompt + `max_new_tokens` longer
        than `config.model.max_length`.
    """
    if not prompts:
      raise ValueError("no prompts")
    for i, prompt in enumerate(prompts):
      if len(prompt) == 0:
        raise ValueError(f"prompt {i} is empty")
    longest = max(len(p) for p in prompts)
    check_length(self.spec, longest, max_new_tokens)
    padded_len = prompt_bucket * math.ceil(longest / prompt_bucket)
    rows = list(prompts)
    mesh, rules = self.mesh, self.rules
    if mesh is not None:
      # The batch splits over the mesh axes `batch` maps to: fill it up with copies of the
      # first prompt (their outputs are dropped).
      spec_axes = logical_to_spec(("batch",), rules, mesh=mesh)[0] or ()
      spec_axes = (spec_axes,) if isinstance(spec_axes, str) else spec_axes
      shards = math.prod(mesh.shape[a] for a in spec_axes)
      rows += [rows[0]] * (-len(rows) % shards)
    tokens, lengths = left_pad(rows, padded_len, pad_id)
    if mesh is not None:
      tokens = jax.device_put(tokens, batch_sharding(mesh, rules))
      lengths = jax.device_put(lengths, batch_sharding(mesh, rules, ndim=1))
    sampler = self._sampler(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                            stop_ids=tuple(stop_ids), temperature=temperature, top_k=top_k,
                            top_p=top_p)
    out = sampler(params, tokens, lengths, jax.random.PRNGKey(0) if rng is None else rng)
    n = len(prompts)
    out = {k: np.asarray(jax.device_get(v))[:n] for k, v in out.items()}
    return SampleOutput(tokens=out["tokens"], log_probs=out["log_probs"], mask=out["mask"],
                        lengths=out["lengths"])


def generate(spec: ModelSpec, params: Params, prompts: list[list[int]], *, mesh=None,
             rules: Rules | None = None, weights: str = "compute", **kwargs) -> SampleOutput:
  """One `Sampler.generate` call (compiles afresh: a loop should keep a `Sampler`)."""
  return Sampler(spec, mesh, rules, weights).generate(params, prompts, **kwargs)

"""A routed mixture-of-experts MLP (Mixtral, Qwen3-MoE) with dropless grouped matmuls.

    x [tokens, d] -> router logits [tokens, E] -> softmax -> top-k (weights, experts)
      -> (token, choice) pairs sorted by expert -> ragged_dot with the experts' SwiGLU weights
      -> weighted sum of each token's k expert outputs

Routing. Probabilities are the softmax over all E experts; a token takes its k most probable
experts. Mixtral (Jiang et al., 2024) renormalises the k weights to sum to 1 (the same as a
softmax over the top-k logits); Qwen3-MoE keeps the raw probabilities unless
`norm_topk_prob` (our `router_norm_topk`).

Dispatch is *dropless*: every (token, choice) pair is computed; none is dropped for capacity.
The pairs are sorted by expert, so each expert's inputs are one contiguous block, and
`jax.lax.ragged_dot` multiplies block e by expert e's weights (MegaBlocks, Gale et al., 2023).
The work is exactly tokens * k expert MLPs whatever the balance (models/flops.py counts
active parameters only).

Auxiliary losses, per MoE layer over its non-padding tokens, averaged over layers:
  load balance (Switch, Fedus et al., 2021, eq. 4; Mixtral's `load_balancing_loss_func`):
      E * sum_e f_e * P_e,  f_e = share of tokens with e among their k choices (no gradient),
                            P_e = mean router probability of e;  k when perfectly balanced;
  router z-loss (ST-MoE, Zoph et al., 2022, eq. 5): mean over tokens of logsumexp(logits)^2.
Each layer records them as an `nnx.Intermediate` named `moe_aux`; the block stack
collects them out of its scan (models/decoder.py), and `pop_moe_aux(model)` hands the sums to
the CLM objective after the forward pass (training/stages/clm.py), which adds
`moe_aux_coef * load + moe_z_coef * z`.

Sharding: expert weights carry the logical axis `expert` (parallel/rules.py; the `fsdp_tp_ep`
preset places experts on the `data` axis), so each device stores E / data of them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.layers import dense, dtype_of, param
from parallel.rules import constrain

AUX_NAME = "moe_aux"


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Router logits `[tokens, E]` -> (weights `[tokens, k]` f32, experts `[tokens, k]` int,
  probabilities `[tokens, E]` f32)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts, probs


def aux_losses(logits: jax.Array, probs: jax.Array, experts: jax.Array, valid: jax.Array
               ) -> dict[str, jax.Array]:
  """Load-balancing and z-loss of one layer (module docstring) over the `valid` tokens.

  Args:
    logits, probs: `[tokens, E]` router logits and softmax.
    experts: `[tokens, k]` chosen experts.
    valid: `[tokens]` bool, False for padding.
  """
  num_experts = probs.shape[-1]
  w = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  chosen = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=1)  # [T, E]
  f = jnp.sum(chosen * w[:, None], axis=0) / count
  p = jnp.sum(probs * w[:, None], axis=0) / count
  load = num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)
  z = jnp.sum(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)) * w) / count
  return {"load_balance": load, "router_z": z}


def grouped_swiglu(x: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array) -> jax.Array:
  """Every (token, choice) pair through its expert: `[tokens, k]` outputs `[tokens, k, d]`.

  Args:
    x: `[tokens, d]`.
    experts: `[tokens, k]` int expert ids.
    gate, up: `[E, d, f]`; down: `[E, f, d]`.
  """
  t, k = experts.shape
  num_experts = gate.shape[0]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)             # pairs grouped by expert
  xs = jnp.take(x, order // k, axis=0)               # [t * k, d]
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  out = jax.lax.ragged_dot(h, down, sizes)           # [t * k, d], sorted order
  unsorted = jnp.zeros_like(out).at[order].set(out)  # back to (token, choice) order
  return unsorted.reshape(t, k, -1)


class MoE(nnx.Module):
  """Routed SwiGLU experts in place of the dense MLP (see the module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, e = cfg.d_model, cfg.num_experts
    f = cfg.expert_mlp_dim or cfg.mlp_dim
    if cfg.activation != "swiglu":
      raise ValueError("config.model.num_experts > 0 needs activation 'swiglu' (the experts "
                       f"are SwiGLU MLPs), got {cfg.activation!r}")
    if not 0 < cfg.experts_per_token <= e:
      raise ValueError(f"config.model.experts_per_token must be in [1, num_experts={e}], got "
                       f"{cfg.experts_per_token}")
    if cfg.mlp_bias:
      raise ValueError("config.model.mlp_bias: MoE experts have no biases")
    pdt = dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    self.k = cfg.experts_per_token
    self.normalize = bool(cfg.router_norm_topk)
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    self.router = param(rngs, init, (d, e), ("embed", "expert"), pdt)
    self.gate = param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), pdt)
    self.up = param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), pdt)
    self.down = param(rngs, out_init, (e, f, d), ("expert", "mlp", "embed"), pdt)

  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """x `[batch, length, d]` -> `[batch, length, d]`; sows this layer's aux losses.

    Args:
      valid: `[batch, length]` bool, False for padding (left out of the aux losses); None:
        every token counts.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # Router in float32: top-k decisions on bf16 logits flip on near-ties between runs.
    logits = dense(x2.astype(jnp.float32), self.router[...].astype(jnp.float32))
    weights, experts, probs = route(logits, self.k, self.normalize)
    valid = (jnp.ones(lead, bool) if valid is None else valid).reshape(-1)
    self.moe_aux = nnx.Intermediate(aux_losses(logits, probs, experts, valid))
    w = lambda p: p[...].astype(self.dtype)
    out = grouped_swiglu(x2, experts, w(self.gate), w(self.up), w(self.down))
    y = jnp.einsum("tkd,tk->td", out, weights.astype(self.dtype))
    return constrain(y.reshape(*lead, -1), ("batch", "length", "act_embed"))


def pop_aux(module: nnx.Module) -> dict[str, jax.Array]:
  """Removes the `moe_aux` intermediates sown under `module`; returns each loss summed over
  them ({} when none was sown)."""
  sown = nnx.to_pure_dict(nnx.pop(module, nnx.Intermediate))
  totals: dict[str, jax.Array] = {}

  def visit(node):
    if isinstance(node, dict):
      for key, value in node.items():
        if key == AUX_NAME:
          for name, loss in value.items():
            totals[name] = totals.get(name, 0.0) + jnp.sum(loss)
        else:
          visit(value)

  visit(sown)
  return totals

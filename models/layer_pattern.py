"""Local / global layer patterns (Gemma 2 / 3), kept static under `scan_layers`.

With `config.model.sliding_window_pattern` N > 0, layer i is *global* when (i + 1) % N == 0
and *local* otherwise (Gemma 2: N 2, local first; Gemma 3: N 6, five local then one global).
Local layers attend within `sliding_window` and rotate by the local RoPE base; global ones see
the whole segment (models/attention.py `Attention.layer_settings`).

Why group instead of passing a per-layer flag through the scan: the window then stays a
Python int in every layer, so the blockwise kernel plans the local layers' key-block band at
trace time (models/flash_attention.py skips what the window excludes), every kernel takes the
window it already takes, and the KV-cache path needs no traced window either. So the stacked
layers `[num_layers, ...]` are scanned N at a time: the scan body is one period of the
pattern, unrolled, each layer with its static kind (layer g * N + j has the kind of layer j).
Layers past the last whole period (Gemma 3 1B: 26 = 4 * 6 + 2) run unrolled after the scan.
The params keep their plain `[num_layers, ...]` stacking: checkpoints and conversion do not
see the grouping.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections


def layer_kinds(cfg: ml_collections.ConfigDict) -> tuple[bool, ...] | None:
  """Per layer, whether it is local (True) or global; None: every layer alike (no pattern)."""
  period = int(cfg.get("sliding_window_pattern", 0) or 0)
  if period <= 0:
    return None
  return tuple((i + 1) % period != 0 for i in range(cfg.num_layers))


def _stack(parts: list) -> Any:
  return jax.tree.map(lambda *v: jnp.stack(v), *parts)


def scan_layers(body: Callable, carry: Any, xs: Any, kinds: tuple[bool, ...] | None,
                period: int) -> tuple[Any, Any]:
  """`jax.lax.scan` over layers, with each layer's static kind.

  Args:
    body: `body(carry, layer_xs, local) -> (carry, y)`; `local` is a Python bool (None when
      `kinds` is None).
    carry: the loop carry (the residual stream).
    xs: a pytree of per-layer arrays, leading axis `num_layers` (stacked params, cache slices).
    kinds: `layer_kinds(cfg)`.
    period: the pattern's period N (unused when `kinds` is None).
  Returns:
    `(carry, ys)` with ys stacked `[num_layers, ...]` in layer order, as `jax.lax.scan` gives.
  """
  if kinds is None:
    return jax.lax.scan(lambda c, x: body(c, x, None), carry, xs)
  n = len(kinds)
  groups = n // period
  outs = []
  if groups:
    whole = groups * period
    grouped = jax.tree.map(lambda a: a[:whole].reshape(groups, period, *a.shape[1:]), xs)

    def group_body(c, group_xs):
      ys = []
      for j in range(period):
        c, y = body(c, jax.tree.map(lambda a, j=j: a[j], group_xs), kinds[j])
        ys.append(y)
      return c, _stack(ys)

    carry, ys = jax.lax.scan(group_body, carry, grouped)
    outs.append(jax.tree.map(lambda a: a.reshape(whole, *a.shape[2:]), ys))
  tail = []
  for i in range(groups * period, n):
    carry, y = body(carry, jax.tree.map(lambda a, i=i: a[i], xs), kinds[i])
    tail.append(y)
  if tail:
    outs.append(_stack(tail))
  ys = outs[0] if len(outs) == 1 else jax.tree.map(lambda *v: jnp.concatenate(v), *outs)
  return carry, ys

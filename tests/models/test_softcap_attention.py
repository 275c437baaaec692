"""Attention-logit soft-capping (Gemma 2): the blockwise kernel's forward and custom backward
equal the dense reference's (autodiff through c * tanh(s / c)), and the kernels that cannot
cap are refused at config time, by a line naming config.model.attention."""

import jax
import jax.numpy as jnp
import numpy as np

from configs.models import model_config
from models.attention import dense_attention, segment_mask
from models.attention_kernels import Layer, kernel_problems, resolve_kernel
from models.flash_attention import flash_attention

CAP = 1.5   # small enough that most logits sit on tanh's curve, not its linear part


def test_blockwise_softcap_forward_and_gradients_match_dense():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) * 2.0
  k = jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) * 2.0
  v = jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32)
  # Row 0: two documents; row 1: one document then padding.
  seg = jnp.asarray([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], jnp.int32)
  real = (seg > 0)[:, :, None, None]
  # Padding queries' outputs are unspecified: compare, and differentiate, real rows only.
  cot = jnp.where(real, jnp.asarray(rng.normal(size=q.shape), jnp.float32), 0.0)

  @jax.jit   # forward and backward in one program (eager dispatch of the switches is slow)
  def output_and_grads(q, k, v, kernel):
    out, vjp = jax.vjp(kernel, q, k, v)
    return jnp.where(real, out, 0.0), vjp(cot)

  mask = segment_mask(seg, seg, causal=True, window=6)
  dense = lambda q, k, v: dense_attention(q, k, v, mask, 0.3, softcap=CAP)
  blockwise = lambda q, k, v: flash_attention(q, k, v, seg, 0.3, causal=True, block=4,
                                              window=6, softcap=CAP)
  want, want_grads = output_and_grads(q, k, v, jax.tree_util.Partial(dense))
  got, grads = output_and_grads(q, k, v, jax.tree_util.Partial(blockwise))
  np.testing.assert_allclose(got, want, atol=1e-5)
  for g, ref in zip(grads, want_grads):
    np.testing.assert_allclose(g, ref, atol=1e-5)
  uncapped = dense_attention(q, k, v, mask, 0.3)
  assert float(jnp.abs(jnp.where(real, uncapped, 0.0) - want).max()) > 1e-2


def test_kernels_without_softcap_are_refused_and_auto_falls_back():
  layer = Layer(causal=True, window=4096, head_dim=256, dtype="bfloat16", kernel_block=0,
                softcap=50.0)
  assert resolve_kernel("auto", layer, "tpu") == "blockwise"
  assert resolve_kernel("auto", layer, "gpu") == "blockwise"
  cfg = model_config("gemma2_9b")
  cfg.attention = "splash"
  (line,) = kernel_problems(cfg, causal=True, platform="tpu")
  assert line.startswith("config.model.attention 'splash'") and "soft-cap" in line
  cfg.attention = "blockwise"
  assert kernel_problems(cfg, causal=True, platform="tpu") == []

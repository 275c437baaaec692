"""Every attention kernel against the dense reference (values and gradients), which kernel a
platform gets, the configurations a forced kernel refuses, and the TPU train step with splash.

The Pallas kernels run in Pallas's interpreter on a CPU (`interpret=True`): the same kernel
code, so the numbers are the kernel's own. On a GPU host the Pallas GPU kernel runs natively
and cuDNN is checked against the dense reference too (`ON_GPU`); elsewhere only cuDNN's
dispatch and config-time refusals are tested (the Pallas GPU kernel also lowers for CUDA from
this host). Float32 matmuls run at full precision on every backend here (`_PRECISE`: on GPUs
XLA's default for float32 is TF32).

Tolerances: float32 inputs within 2e-5 of the float32 dense reference (values) and 1e-4
(gradients); bfloat16 inputs within 6e-2 of it (values, O(1) outputs: bfloat16's 8-bit
mantissa, about 4e-3 relative per rounding, over sums of 256 keys).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import pretrain
from configs.models import model_config
from models.attention import attend, dense_attention, segment_mask
from models.attention_kernels import (Layer, kernel_problems, resolve_kernel, run_per_device,
                                      step_platform)
from models.gpu_attention import pallas_gpu_attention
from parallel.rules import MESH_AXES, get_rules, use_mesh_rules
from parallel.tpu_topology import parse_topology, topology_devices
from scripts.compile_check import lower_train_step
from training.validate import validate_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")

# Row 0: two documents then padding; row 1: one document. 256 tokens: two 128-row tiles.
ON_GPU = jax.default_backend() == "gpu"
_PRECISE = jax.default_matmul_precision("highest")
LENGTH, HEADS, KV_HEADS, HEAD_DIM = 256, 4, 2, 128
SEGMENTS = np.zeros((2, LENGTH), np.int32)
SEGMENTS[0, :100], SEGMENTS[0, 100:230], SEGMENTS[1] = 1, 2, 1
CASES = {"causal": (True, 0), "window": (True, 48), "bidirectional": (False, 0)}
KERNEL_CASES = [(kernel, case) for kernel in ("blockwise", "splash", "pallas_gpu")
                for case in CASES if not (kernel == "pallas_gpu" and case == "window")]


def _inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  q, cot = (rng.normal(size=(2, LENGTH, HEADS, HEAD_DIM)) for _ in range(2))
  k, v = (rng.normal(size=(2, LENGTH, KV_HEADS, HEAD_DIM)) for _ in range(2))
  return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(cot, jnp.float32)


def _real(x):
  """Padding queries' outputs are unspecified (the caller zeroes them): compare the rest."""
  return x.astype(jnp.float32) * (SEGMENTS > 0)[:, :, None, None]


def _dense_and_kernel(kernel, case):
  causal, window = CASES[case]
  seg = jnp.asarray(SEGMENTS)
  mask = segment_mask(seg, seg, causal=causal, window=window)
  dense = lambda q, k, v: _real(dense_attention(q, k, v, mask, 0.1))
  # 128-row blocks (blockwise) and tiles (Pallas): two of each per row.
  # On a GPU the Pallas GPU kernel runs natively; the others (TPU kernels) interpreted.
  interpret = not (ON_GPU and kernel == "pallas_gpu")
  got = lambda q, k, v: _real(attend(kernel, q, k, v, seg, 0.1, causal=causal, window=window,
                                     block=128, interpret=interpret))
  return dense, got


@pytest.mark.parametrize("kernel,case", KERNEL_CASES)
def test_kernel_equals_dense(kernel, case):
  (q, k, v), cot = _inputs()
  dense, got = _dense_and_kernel(kernel, case)
  with _PRECISE:
    want, want_vjp = jax.vjp(dense, q, k, v)
    out, got_vjp = jax.vjp(jax.jit(got), q, k, v)
    grads = got_vjp(cot), want_vjp(cot)
  np.testing.assert_allclose(out, want, atol=2e-5)
  for g, w in zip(*grads):
    np.testing.assert_allclose(g, w, atol=1e-4)


@pytest.mark.parametrize("kernel", ["blockwise", "splash", "pallas_gpu"])
def test_kernel_in_bfloat16_tracks_float32_dense(kernel):
  (q, k, v), _ = _inputs()
  dense, got = _dense_and_kernel(kernel, "causal")
  out = jax.jit(got)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  with _PRECISE:
    want = dense(q, k, v)
  np.testing.assert_allclose(out, want, atol=6e-2)
  assert float(jnp.abs(out - want).mean()) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_in_bfloat16_tracks_float32_dense(case):
  # cuDNN takes rows of one document from slot 0 (row 1: the whole row; row 0: 230 tokens,
  # then padding); values and gradients in bfloat16 against the float32 reference.
  causal, window = CASES[case]
  segments = np.zeros((2, LENGTH), np.int32)
  segments[0, :230], segments[1] = 1, 1
  seg = jnp.asarray(segments)
  real = lambda x: x.astype(jnp.float32) * (seg > 0)[:, :, None, None]
  mask = segment_mask(seg, seg, causal=causal, window=window)
  (q, k, v), cot = _inputs()
  dense = lambda q, k, v: real(dense_attention(q, k, v, mask, 0.1))
  got = lambda q, k, v: real(attend("cudnn", q, k, v, seg, 0.1, causal=causal,
                                    window=window))
  with _PRECISE:
    want, want_vjp = jax.vjp(dense, q, k, v)
    grads_want = want_vjp(cot)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, got_vjp = jax.vjp(jax.jit(got), *low)
  np.testing.assert_allclose(out, want, atol=6e-2)
  assert float(jnp.abs(out - want).mean()) < 1e-2
  for g, w in zip(got_vjp(cot), grads_want):
    scale = float(jnp.abs(w).max())
    assert float(jnp.abs(g.astype(jnp.float32) - w).max()) < 5e-2 * scale


def _layer(**overrides):
  fields = dict(causal=True, window=0, head_dim=64, dtype="bfloat16", kernel_block=0)
  return Layer(**{**fields, **overrides})


def test_auto_picks_by_platform():
  assert resolve_kernel("auto", _layer(), "tpu") == "splash"
  assert resolve_kernel("auto", _layer(window=4096), "tpu") == "splash"
  assert resolve_kernel("auto", _layer(), "gpu") == "pallas_gpu"
  # The Pallas GPU kernel has no window, and cuDNN takes no packed rows.
  assert resolve_kernel("auto", _layer(window=4096), "gpu") == "blockwise"
  assert resolve_kernel("auto", _layer(), "cpu") == "blockwise"
  assert resolve_kernel("cudnn", _layer(causal=False), "gpu") == "cudnn"


@pytest.mark.parametrize("name,layer,platform,message", [
    ("splash", _layer(), "cpu", "'splash' runs on TPU; this run's devices are CPU"),
    ("cudnn", _layer(dtype="float32"), "gpu", "computes in bfloat16 / float16, not float32"),
    ("cudnn", _layer(head_dim=260), "gpu", "head_dim a multiple of 8 up to 256, got 260"),
    ("pallas_gpu", _layer(window=4096), "gpu", "no sliding window"),
    ("splash", _layer(kernel_block=192), "tpu", "power of two >= 128, got 192"),
    ("flash", _layer(), "cpu", "unknown 'flash'"),
])
def test_a_forced_kernel_that_cannot_serve_is_refused(name, layer, platform, message):
  with pytest.raises(ValueError, match="config.model.attention") as error:
    resolve_kernel(name, layer, platform)
  assert message in str(error.value)


def test_config_validation_names_the_kernel():
  config = pretrain.get_config("tiny")
  config.model.attention = "splash"
  assert validate_config(config, device_count=8) == [
      "config.model.attention 'splash': 'splash' runs on TPU; this run's devices are CPU"]
  assert validate_config(config, device_count=8, platform="tpu") == []
  config.model.update(attention="cudnn", dtype="bfloat16")
  # Every stage packs rows, which cuDNN's entry cannot take, whatever the GPU.
  assert "one document per row" in validate_config(config, device_count=8, platform="gpu")[0]
  encoder = model_config("tiny")
  encoder.update(attention="pallas_gpu", sliding_window=64)
  assert kernel_problems(encoder, causal=False, platform="gpu") == [
      "config.model.attention 'pallas_gpu': the Pallas GPU kernel has no sliding window"]


def test_pallas_gpu_kernel_lowers_for_cuda():
  """From this CPU host: the Triton kernels (forward and backward) are in the CUDA program."""
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  loss = lambda q, k, v, seg: pallas_gpu_attention(q, k, v, seg, 0.1, causal=True).sum()
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
      shape(2, 256, 4, 64), shape(2, 256, 2, 64), shape(2, 256, 2, 64),
      shape(2, 256, dtype=jnp.int32)).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, delta, backward


@pytest.mark.parametrize("kernel", ["pallas_gpu", "blockwise"])
def test_gpu_paths_never_build_a_square_mask_at_8192(kernel):
  """What `auto` runs on a GPU, lowered for CUDA at 8192 tokens: no [8192, 8192] array."""
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  loss = lambda q, k, v, seg: attend(kernel, q, k, v, seg, 0.1, causal=True).sum()
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
      shape(1, 8192, 2, 64), shape(1, 8192, 1, 64), shape(1, 8192, 1, 64),
      shape(1, 8192, dtype=jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
  assert "tensor<" in text and "8192x8192" not in text


def test_kernels_run_per_device_under_a_mesh():
  """Rows over `data`, heads over `tensor`: each device's kernel sees its own slices."""
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2), MESH_AXES)
  seen = []
  kernel = lambda q, k, v, seg: seen.append((q.shape, k.shape, seg.shape)) or q
  (q, k, v), _ = _inputs()
  with use_mesh_rules(mesh, get_rules("fsdp_tp")):
    assert step_platform() == "cpu"
    out = jax.jit(lambda q, k, v: run_per_device(kernel, q, k, v, jnp.asarray(SEGMENTS)))(q, k, v)
  assert seen == [((1, LENGTH, 2, HEAD_DIM), (1, LENGTH, 1, HEAD_DIM), (1, LENGTH))]
  np.testing.assert_array_equal(out, q)


@needs_libtpu
def test_train_step_compiled_for_tpu_runs_the_splash_kernel():
  """The real CLM train step, compiled for a v5e 2x2 slice (data 2 x tensor 2) from this CPU
  host: its program holds splash's forward and both backward kernels, per device."""
  config = pretrain.get_config("tiny")
  config.model.update(dict(d_model=64, num_layers=2, mlp_dim=128, vocab_size=256,
                           attention="splash"))
  config.data.update(dict(seq_len=128, global_batch_size=8))
  config.mesh.update(dict(data=2, tensor=2))
  devices = topology_devices(parse_topology("v5e:2x2"))
  lowered, setup = lower_train_step(config, devices)
  with use_mesh_rules(setup.mesh, setup.rules):
    assert step_platform() == "tpu"
  text = lowered.compile().as_text()
  for kernel in ("fwd", "dq", "dkv"):
    assert f"splash_mha_{kernel}_segmented" in text
  assert text.count("tpu_custom_call") == 3

"""scripts/decode_check.py: the sampler compiled for an H200 from this host (JAX's CUDA plugin,
no GPU) moves each weight once per decode step when its layers are unrolled, in four GEMMs a
layer."""

import importlib.util

import pytest

from parallel.gpu_target import cuda_plugin_installed, target_config

needs_cuda_plugin = pytest.mark.skipif(
    not cuda_plugin_installed(), reason="compiling for a GPU needs JAX's CUDA plugin "
    "(pip install -e .[gpu_aot])")

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu")

# Matrices large against the KV cache, as in a real model's decode step.
MODEL = dict(d_model=512, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=1024,
             vocab_size=1024)


def test_target_config_names_the_gpu():
  text = target_config("h100")
  assert "core_count: 132" in text and "memory_bandwidth: 3350000000000" in text
  with pytest.raises(ValueError, match="unknown GPU 'a100'"):
    target_config("a100")


@needs_cuda_plugin
def test_unrolled_decode_step_reads_each_weight_once():
  from scripts.decode_check import check
  kw = dict(prompts=8, prompt_len=16, new_tokens=8, model_overrides=MODEL)
  scanned = check("h200", "tiny", unroll=False, **kw)
  unrolled = check("h200", "tiny", **kw)  # the GPU default
  assert unrolled["decode_layers"] == "unrolled"
  # Scanned: every layer's weights are copied out of the stack each step before the GEMMs.
  copies = [k for k in scanned["by_kind"] if "dynamic-slice" in k and "reduce" not in k]
  assert copies and scanned["traffic_ratio"] > 2.0
  assert not any("dynamic-slice" in k for k in unrolled["by_kind"])
  assert unrolled["traffic_ratio"] < 1.3
  assert unrolled["kernels"] < scanned["kernels"]
  # Seven GEMMs a layer scanned; unrolled four (q / k / v and gate / up joined); the LM head.
  gemms = lambda r: r["by_kind"]["__cublas$lt$matmul"][0]
  assert (gemms(scanned), gemms(unrolled)) == (7 * 2 + 1, 4 * 2 + 1)
  # Attention: one decode kernel a layer (models/decode_attention.py), reading its layer of
  # the stacked cache in place; the scanned step keeps the XLA form.
  assert unrolled["by_kind"]["decode_attention"][0] == 2
  assert "decode_attention" not in scanned["by_kind"]
  # It takes the joined projection and applies RoPE itself: no rotation (a concatenation of
  # the halves) is left in the step but the cache's append.
  assert all("dynamic-update-slice" in k for k in unrolled["by_kind"] if "concatenate" in k)
  assert any("concatenate" in k and "dynamic-update-slice" not in k for k in scanned["by_kind"])
  # The slices are made after the prefill's stacked copy is freed: no extra memory.
  assert unrolled["temp_bytes"] <= 1.05 * scanned["temp_bytes"]
  # int8: the Triton GEMMs read the int8 weights (no converted copies), fewer bytes.
  int8 = check("h200", "tiny", weights="int8", **kw)
  assert "__cublas$lt$matmul" not in int8["by_kind"]
  assert int8["by_kind"]["dot"][0] == 4 * 2 + 1
  assert int8["by_kind"]["dot"][1] < 0.65 * unrolled["by_kind"]["__cublas$lt$matmul"][1]
  # --decode_gemm pallas: every product of the step is models/decode_gemm.py's kernel,
  # compiled by Triton (its custom call), reading each weight once (plus its float32 partial
  # sums, here of 8 rows padded to 16), the int8 weights as stored.
  cublas = unrolled["by_kind"]["__cublas$lt$matmul"][1]
  for weights, most in (("compute", 1.15), ("int8", 0.65)):
    pallas = check("h200", "tiny", weights=weights, gemm="pallas", **kw)
    assert "__cublas$lt$matmul" not in pallas["by_kind"] and "dot" not in pallas["by_kind"]
    count, moved = pallas["by_kind"]["__gpu$xla.gpu.triton"]
    assert count == 4 * 2 + 1 and moved < most * cublas


@needs_cuda_plugin
def test_tensor_parallel_decode_step_runs_the_kernel_on_each_gpu():
  """On 2 GPUs (heads split) each runs the decode kernel on its own key heads of the stacked
  cache: one launch a layer reading half the cache in place, and each GPU moves about half the
  step's minimum."""
  from scripts.decode_check import check
  kw = dict(prompts=8, prompt_len=16, new_tokens=8, model_overrides=MODEL)
  one, two = check("h200", "tiny", **kw), check("h200", "tiny", tensor=2, **kw)
  assert two["tensor"] == 2 and two["minimum_bytes"] == one["minimum_bytes"] / 2
  kernel = lambda r: r["by_kind"]["decode_attention"]
  assert kernel(two)[0] == kernel(one)[0] == 2
  assert kernel(two)[1] < 0.6 * kernel(one)[1]
  assert two["traffic_ratio"] < 1.3


@needs_libtpu
def test_tpu_decode_step_reads_the_cache_as_stored():
  """On a v5e chip (libtpu, from this host) the scanned decode step reads each layer's cache
  slice in the matrix unit as stored: no converted copy of it is written each step (the
  multiply-and-sum form of the other platforms made XLA:TPU write one per layer)."""
  from scripts.decode_check import check
  r = check("v5e:1x1", "tiny", prompts=8, prompt_len=16, new_tokens=8, model_overrides=MODEL)
  assert r["decode_layers"] == "scan"
  copies = sum(b for kind, (_, b) in r["by_kind"].items() if "dynamic-slice" in kind)
  assert copies < 0.05 * r["minimum_bytes"], r["summary"]
  assert r["traffic_ratio"] < 1.2, r["summary"]
  # Tensor-parallel over 2 chips: each moves about half of it, gathering nothing big.
  two = check("v5e:2x2", "tiny", prompts=8, prompt_len=16, new_tokens=8, tensor=2,
              model_overrides=MODEL)
  assert two["minimum_bytes"] == r["minimum_bytes"] / 2
  assert two["traffic_ratio"] < 1.3, two["summary"]

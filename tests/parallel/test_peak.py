"""The MFU denominator's table (parallel/peak.py): chips matched by their device_kind."""

import pytest

from parallel.peak import published_memory_bandwidth, published_peak_flops


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),  # the more specific name wins
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H20", "bfloat16", 148e12),
    ("NVIDIA H200", "float32", 989e12 / 2),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("cpu", "bfloat16", None),
    ("Some Future Chip", "bfloat16", None),
])
def test_published_peak(kind, dtype, peak):
  assert published_peak_flops(kind, dtype) == peak


@pytest.mark.parametrize("kind, rate", [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H200", 4.8e12),
    ("TPU v5 lite", 819e9), ("cpu", None)])
def test_published_memory_bandwidth(kind, rate):
  assert published_memory_bandwidth(kind) == rate

"""scripts/gemm_check.py: the decode step's products of a preset, timed each way (on a CPU
only in Pallas's interpreter, whose times mean nothing: the shapes, bytes and sums are what
is checked here)."""

import pytest

from configs import pretrain
from scripts import gemm_check


def test_decode_products_of_the_1b_model():
  """d 2048, 16 heads of 128 over 8 key heads, SwiGLU 5632, vocab 32000 untied, 16 layers."""
  assert gemm_check.decode_products(pretrain.get_config("1b").model) == [
      ("qkv", 2048, (16 + 2 * 8) * 128, 16, False), ("o", 2048, 2048, 16, False),
      ("gate_up", 2048, 2 * 5632, 16, False), ("down", 5632, 2048, 16, False),
      ("head", 2048, 32000, 1, False)]


def test_check_times_every_product_each_way():
  r = gemm_check.check("tiny", rows=4, weights="int8", variants=("plan", "no_split"),
                       stream_mib=1, max_copies=2, repeats=1, interpret=True)
  cfg = pretrain.get_config("tiny").model
  assert [p["name"] for p in r["products"]] == ["qkv", "o", "gate_up", "down", "head"]
  for p in r["products"]:
    # int8 values plus a float32 scale per output column.
    assert p["weight_bytes"] == p["k"] * p["n"] + 4 * p["n"]
    assert p["copies"] == 2 and all(p[f"{w}_s"] > 0 for w in ("xla", "plan", "no_split"))
  head = r["products"][-1]
  assert head["transposed"] == bool(cfg.tie_embeddings) and head["count"] == 1
  assert r["step_weight_bytes"] == sum(p["weight_bytes"] * p["count"] for p in r["products"])
  assert r["step_s"]["xla"] == pytest.approx(sum(p["xla_s"] * p["count"]
                                                 for p in r["products"]))
  text = gemm_check.format_check(r)
  assert "INTERPRETER" in text and "decode step's products" in text


def test_the_kernel_needs_a_gpu_or_the_interpreter():
  with pytest.raises(ValueError, match="runs on a GPU"):
    gemm_check.check("tiny", rows=4)

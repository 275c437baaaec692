"""models/decode_gemm.py (the GPU decode products, run in Pallas's interpreter): the tiling it
plans, its products against float64 (split K, transposed, int8 with scales, padded rows), and
the sampler with it against the sampler without."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decode_gemm
from models.decode_gemm import Plan, plan, problem, skinny_dot
from models.quantize import quantize_int8


def test_plan_of_the_1b_decode_products():
  """Hand-worked tilings of the 1B model's products at 32 rows (d 2048, 16 heads of 128 over
  8 key heads, MLP 5632, vocab 32000): splits until 256 programs, the float32 partials at
  most an eighth of the weights (splits x 32 x 4 bytes <= K x 2 / 8), block_n halving where
  those splits leave too few programs."""
  assert plan(32, 2048, 4096) == Plan(64, 64, 4)    # q / k / v: 64 blocks x 4 = 256
  # o: 32 blocks of 64 would need 8 splits; at most 2048 x 2 / 1024 = 4 allowed, so 64
  # blocks of 32 x 4 = 256.
  assert plan(32, 2048, 2048) == Plan(32, 64, 4)
  assert plan(32, 2048, 11264) == Plan(64, 64, 2)   # gate / up: 176 blocks x 2
  assert plan(32, 5632, 2048) == Plan(64, 64, 8)    # down: 88 blocks of K, 8 splits of 11
  assert plan(32, 2048, 32000) == Plan(64, 64, 1)   # head: 500 blocks
  # int8 weights: half the bytes, so half the splits allowed (o: 2).
  assert plan(32, 2048, 2048, weight_bytes=1) == Plan(32, 64, 2)
  # 128 rows: partials of 128 rows allow no split of o's K.
  assert plan(128, 2048, 2048) == Plan(32, 64, 1)
  # Each part keeps at least MIN_STEPS blocks of K: K 256 has 4, so no split (and with one
  # program either way, block_n goes down to 32).
  assert plan(8, 256, 64) == Plan(32, 64, 1)
  assert problem(129, 64, 64) and problem(8, 40, 64) and problem(8, 64, 40)
  assert problem(128, 64, 64) is None


def _reference(x, w, scale=None, transposed=False):
  w = np.asarray(w, np.float64)
  y = np.asarray(x, np.float64) @ (w.T if transposed else w)
  return y * np.asarray(scale, np.float64) if scale is not None else y


@pytest.mark.parametrize("rows, k, n, transposed, splits", [
    (32, 512, 96, False, None),   # plan: block_n 32, 2 splits
    (32, 512, 128, False, 4),     # 4 parts of K, summed outside the kernel
    (5, 256, 64, False, None),    # rows padded to 16
    (8, 512, 64, True, 2),        # the table `[N, K]` transposed (a tied LM head)
])
def test_skinny_dot_matches_float64(rows, k, n, transposed, splits):
  rng = np.random.default_rng(rows + k + n)
  x = rng.normal(size=(rows, k)).astype(np.float32)
  w = rng.normal(size=(n, k) if transposed else (k, n)).astype(np.float32)
  got = skinny_dot(jnp.asarray(x), jnp.asarray(w), transposed=transposed, splits=splits,
                   interpret=True)
  assert got.shape == (rows, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _reference(x, w, transposed=transposed),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("splits", [1, 2])
def test_int8_weights_are_converted_in_the_kernel_and_scaled(splits):
  """int8 values and per-column scales (models/quantize.py): (x @ q) * scale, in bfloat16
  out, the scale applied in the kernel (1 split) or after the sum of the parts."""
  rng = np.random.default_rng(splits)
  x = rng.normal(size=(16, 512)).astype(np.float32)
  w = quantize_int8(jnp.asarray(rng.normal(size=(512, 64)), jnp.float32), (0,), jnp.float32)
  scale = w.scale.reshape(-1)
  got = skinny_dot(jnp.asarray(x, jnp.bfloat16), w.q, scale, splits=splits, interpret=True)
  assert got.dtype == jnp.bfloat16
  want = _reference(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), w.q, scale)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=5e-2)
  f32 = skinny_dot(jnp.asarray(x), w.q, scale, out_dtype=jnp.float32, splits=splits,
                   interpret=True)
  np.testing.assert_allclose(np.asarray(f32), _reference(x, w.q, scale), rtol=1e-5, atol=1e-4)


def test_bad_arguments_name_the_problem():
  x = jnp.zeros((8, 64))
  with pytest.raises(ValueError, match="do not contract"):
    skinny_dot(x, jnp.zeros((32, 16)), interpret=True)
  with pytest.raises(ValueError, match="3 splits do not divide"):
    skinny_dot(jnp.zeros((8, 256)), jnp.zeros((256, 16)), splits=3, interpret=True)
  with pytest.raises(ValueError, match="GPU"):
    decode_gemm.check_gemm("pallas", "cpu")
  with pytest.raises(ValueError, match="unknown decode GEMM 'cublas'"):
    decode_gemm.check_gemm("cublas", "gpu")
  decode_gemm.check_gemm("xla", "cpu")
  decode_gemm.check_gemm("pallas", "gpu")


def _sample(model, prompts, gemm, mesh=None, rules=None, **kw):
  from models import sampler
  tokens, lengths = sampler.left_pad(prompts, 8, 0)
  sample = sampler.make_sampler(model.spec, max_new_tokens=5, eos_id=-1, temperature=1.0,
                                mesh=mesh, rules=rules, gemm=gemm, **kw)
  return jax.device_get(sample(model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                               jax.random.PRNGKey(3)))


def _record_calls(monkeypatch):
  """Lets the sampler take "pallas" on a CPU (run in the interpreter, as the sampler does off a
  GPU) and records each kernel call's (x shape, w shape, w dtype, transposed)."""
  calls = []
  real = decode_gemm.skinny_dot
  monkeypatch.setattr(decode_gemm, "check_gemm", lambda gemm, platform: None)
  monkeypatch.setattr(decode_gemm, "skinny_dot", lambda x, w, *a, **kw: calls.append(
      (x.shape, w.shape, w.dtype.name, kw["transposed"])) or real(x, w, *a, **kw))
  return calls


@pytest.mark.parametrize("overrides, weights, unroll", [
    (dict(tie_embeddings=False), "compute", True),   # the GPU step: unrolled, joined
    (dict(tie_embeddings=True), "int8", True),        # int8, the tied table transposed
    (dict(tie_embeddings=False, qkv_bias=True), "compute", False),  # scanned, biases
])
def test_sampler_with_the_kernel_equals_the_xla_sampler(monkeypatch, overrides, weights,
                                                        unroll):
  """Every product of a decode step through the kernel (each layer's four joined ones, or
  seven scanned, and the LM head), the prefill not: the same tokens and log-probs as XLA's."""
  from tests.models.test_sampler import PROMPTS, Model
  model = Model(**overrides)  # d 32, 4 heads of 8 over 2, MLP 64, vocab 64, 2 layers
  plain = _sample(model, PROMPTS, "xla", weights=weights, unroll=unroll)
  calls = _record_calls(monkeypatch)
  got = _sample(model, PROMPTS, "pallas", weights=weights, unroll=unroll)
  np.testing.assert_array_equal(got["tokens"], plain["tokens"])
  np.testing.assert_allclose(got["log_probs"], plain["log_probs"], atol=1e-5)
  rows = len(PROMPTS)
  assert {c[0] for c in calls} <= {(rows, 32), (rows, 64)}  # one token a row: no prefill
  dtype = "int8" if weights == "int8" else "float32"
  assert {c[2] for c in calls} == {dtype}
  head = (64, 32) if overrides["tie_embeddings"] else (32, 64)
  assert (head in {c[1] for c in calls if c[3] == overrides["tie_embeddings"]})
  # Traced once: unrolled, each layer's q/k/v, o, gate/up, down; scanned, the scan body's
  # seven products once; and the head.
  assert len(calls) == (4 * 2 + 1 if unroll else 7 + 1)


def test_sharded_sampler_runs_the_kernel_on_each_devices_rows(monkeypatch):
  """Data-parallel (rows over data 4 x fsdp 2, weights split along K over fsdp): the kernel
  runs inside shard_map on each device's row against the gathered weight, with XLA's
  tokens and log-probs on the same mesh. Tensor-parallel (heads and MLP columns split): the
  products stay XLA's."""
  from parallel.rules import get_rules
  from tests.models.test_decode_attention import _mesh
  from tests.models.test_sampler import PROMPTS, Model
  model = Model(tie_embeddings=False)
  prompts, rules = (PROMPTS + [[2, 9]]) * 2, get_rules("fsdp_tp")
  plain = _sample(model, prompts, "xla", _mesh(2, 1), rules, unroll=True)
  calls = _record_calls(monkeypatch)
  got = _sample(model, prompts, "pallas", _mesh(2, 1), rules, unroll=True)
  np.testing.assert_array_equal(got["tokens"], plain["tokens"])
  np.testing.assert_allclose(got["log_probs"], plain["log_probs"], atol=1e-5)
  assert len(calls) == 4 * 2 + 1 and {c[0][0] for c in calls} == {1}  # a device's row
  calls.clear()
  _sample(model, prompts, "pallas", _mesh(2, 2), rules, unroll=True)  # tensor 2
  assert calls == []


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the kernel runs natively on a GPU")
def test_kernel_natively_on_a_gpu():
  """Compiled by Triton and run on the GPU at the 1B model's shapes, bfloat16 and int8,
  against the interpreter's run."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 2048)), jnp.bfloat16)
  for n, transposed in ((4096, False), (2048, False), (32000, True)):
    w = jnp.asarray(rng.normal(size=(n, 2048) if transposed else (2048, n)) / 45, jnp.bfloat16)
    native = skinny_dot(x, w, transposed=transposed)
    np.testing.assert_allclose(np.asarray(native, np.float32),
                               _reference(np.asarray(x, np.float32), np.asarray(w, np.float32),
                                          transposed=transposed), atol=3e-2, rtol=2e-2)
  q = quantize_int8(jnp.asarray(rng.normal(size=(5632, 2048)), jnp.float32), (0,), jnp.bfloat16)
  xd = jnp.asarray(rng.normal(size=(32, 5632)), jnp.bfloat16)
  native = skinny_dot(xd, q.q, q.scale.reshape(-1), out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(native),
                             _reference(np.asarray(xd, np.float32), q.q, q.scale.reshape(-1)),
                             rtol=1e-3, atol=1e-2)

"""models/decode_attention.py (the GPU decode kernel, run in Pallas's interpreter) computes
models/kv_cache.py `attend`'s decode step: segments, unwritten slots, windows, soft-capping,
grouped heads, the stacked cache read in place, each device's rows and heads under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import kv_cache
from models.attention_kernels import decode_kernel, decode_kernel_fits, decode_local_shape
from models.decode_attention import (BLOCK_K, cache_length, decode_attention,
                                     decode_attention_joined, problem)
from models.layers import apply_rope, rope_tables

CACHE_LEN = 2 * BLOCK_K
INDEX = 70  # slots written; the kernel's second block is partly unwritten


def _case(heads, kv_heads, head_dim, dtype, layers=0, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  b = 3
  stack = (layers,) if layers else ()
  cache_k = normal(*stack, b, kv_heads, CACHE_LEN, head_dim)
  cache_v = normal(*stack, b, kv_heads, CACHE_LEN, head_dim)
  seg = np.zeros((b, CACHE_LEN), np.int32)
  seg[0, 5:INDEX] = 1          # a left-padded prompt
  seg[1, 40:INDEX] = 1
  seg[2, :INDEX] = 1
  seg[2, 10:20] = 2            # another document's slots, never seen by segment 1
  seg[:, INDEX + 3] = 1        # an unwritten slot with a stale id: beyond `index`, unseen
  return dict(q=normal(b, 1, heads, head_dim), k_new=normal(b, 1, kv_heads, head_dim),
              v_new=normal(b, 1, kv_heads, head_dim), q_segments=jnp.ones((b, 1), jnp.int32),
              cache_k=cache_k, cache_v=cache_v, cache_segments=jnp.asarray(seg))


def _reference(c, layer=None, **kw):
  k, v = c["cache_k"], c["cache_v"]
  if layer is not None:
    k, v = k[layer], v[layer]
  cache = kv_cache.KVCache(k=k, v=v, segment_ids=c["cache_segments"], index=jnp.int32(INDEX))
  return kv_cache.attend(c["q"], c["k_new"], c["v_new"], c["q_segments"], cache, 0.3, **kw)


@pytest.mark.parametrize("heads, kv_heads, head_dim, window, softcap", [
    (4, 2, 16, 0, 0.0),     # grouped-query heads
    (8, 2, 32, 5, 0.0),     # a sliding window inside the first block
    (4, 4, 16, 0, 3.0),     # one query head per key head, soft-capped logits
    (16, 1, 16, 70, 0.0),   # 16 query heads on one key head (the padded tile, full)
])
def test_kernel_equals_the_xla_decode_step(heads, kv_heads, head_dim, window, softcap):
  c = _case(heads, kv_heads, head_dim, jnp.float32)
  want = _reference(c, window=window, softcap=softcap)
  got = decode_attention(**c, index=jnp.int32(INDEX), scale=0.3, window=window,
                         softcap=softcap, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_kernel_reads_its_layer_of_the_stacked_cache_in_bfloat16():
  c = _case(8, 4, 32, jnp.bfloat16, layers=3)
  for layer in (0, 2):
    want = _reference(c, layer=layer)
    got = decode_attention(**c, index=jnp.int32(INDEX), layer=layer, scale=0.3,
                           interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2)
  # The XLA form reads the same layer when handed the stack (KVCache.layer).
  stacked = kv_cache.KVCache(k=c["cache_k"], v=c["cache_v"], segment_ids=c["cache_segments"],
                             index=jnp.int32(INDEX), layer=2)
  np.testing.assert_array_equal(
      kv_cache.attend(c["q"], c["k_new"], c["v_new"], c["q_segments"], stacked, 0.3),
      _reference(c, layer=2))


@pytest.mark.parametrize("heads, kv_heads, head_dim, window, softcap, dtype, layers", [
    (4, 2, 32, 0, 0.0, jnp.float32, 0),     # grouped-query heads
    (8, 2, 64, 5, 3.0, jnp.float32, 0),     # a window and soft-capping
    (4, 4, 32, 0, 0.0, jnp.float32, 2),     # one query head per key head, the stacked cache
    (16, 8, 32, 0, 0.0, jnp.bfloat16, 2),   # bfloat16, as sampled
])
def test_joined_kernel_equals_split_rope_and_the_xla_step(heads, kv_heads, head_dim, window,
                                                          softcap, dtype, layers):
  """From the joined projection (the kernel takes each head's columns and applies RoPE): the
  XLA step's output on the split, rotated q / k / v, and the rotated key and the value it
  hands back for the cache."""
  c = _case(heads, kv_heads, head_dim, dtype, layers=layers, seed=3)
  rng = np.random.default_rng(4)
  b = c["q"].shape[0]
  qkv = jnp.asarray(rng.normal(size=(b, 1, (heads + 2 * kv_heads) * head_dim)), dtype)
  positions = jnp.asarray([[INDEX - 5], [INDEX - 40], [INDEX]])  # the rows' own positions
  cos, sin = rope_tables(positions, head_dim, 10_000.0)
  q, k, v = jnp.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
  q = apply_rope(q.reshape(b, 1, heads, head_dim), cos, sin)
  k = apply_rope(k.reshape(b, 1, kv_heads, head_dim), cos, sin)
  v = v.reshape(b, 1, kv_heads, head_dim)
  want = _reference(dict(c, q=q, k_new=k, v_new=v), layer=1 if layers else None,
                    window=window, softcap=softcap)
  out, k_new, v_new = decode_attention_joined(
      qkv, cos, sin, c["q_segments"], c["cache_k"], c["cache_v"], c["cache_segments"],
      jnp.int32(INDEX), heads=heads, kv_heads=kv_heads, layer=1 if layers else None,
      scale=0.3, window=window, softcap=softcap, interpret=True)
  exact = dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             atol=2e-5 if exact else 2e-2)
  np.testing.assert_allclose(np.asarray(k_new, np.float32), np.asarray(k, np.float32),
                             atol=1e-6 if exact else 1e-2)
  np.testing.assert_array_equal(v_new, v)


def test_problems_and_where_the_kernel_runs():
  assert problem(head_dim=128, heads=32, kv_heads=8, cache_len=cache_length(191)) is None
  assert cache_length(191) == 192 and cache_length(64) == 64
  assert "power of two" in problem(head_dim=8, heads=4, kv_heads=2, cache_len=64)
  assert problem(head_dim=16, heads=4, kv_heads=2, cache_len=64) is None
  assert "RoPE's halves" in problem(head_dim=16, heads=4, kv_heads=2, cache_len=64, joined=True)
  assert "multiple of" in problem(head_dim=64, heads=4, kv_heads=2, cache_len=100)
  assert "query heads per key head" in problem(head_dim=64, heads=64, kv_heads=2,
                                               cache_len=64)
  # Only on a GPU (and within the constraints); elsewhere the XLA form serves.
  on_gpu = jax.default_backend() == "gpu"
  assert decode_kernel(head_dim=64, heads=4, kv_heads=2, cache_len=64, batch=3) == on_gpu
  assert not decode_kernel(head_dim=64, heads=4, kv_heads=2, cache_len=100, batch=3)


def _mesh(fsdp, tensor):
  from ml_collections import ConfigDict
  from parallel.mesh import make_mesh
  return make_mesh(ConfigDict(dict(data=-1, fsdp=fsdp, tensor=tensor, dcn_data=1, dcn_fsdp=1,
                                   dcn_tensor=1)))


def test_each_devices_share_of_a_decode_step():
  """Under a mesh the kernel sees each device's rows and heads: rows over data x fsdp, query
  and key heads alike over tensor; a split that does not divide, or key heads split apart
  from the query heads, keeps the XLA form."""
  from parallel.rules import get_rules, use_mesh_rules
  assert decode_local_shape(batch=8, heads=16, kv_heads=4) == (8, 16, 4)  # no mesh
  rules = get_rules("fsdp_tp")
  with use_mesh_rules(_mesh(2, 2), rules):  # data 2 x fsdp 2 x tensor 2
    assert decode_local_shape(batch=8, heads=16, kv_heads=4) == (2, 8, 2)
    assert decode_local_shape(batch=6, heads=16, kv_heads=4) is None     # 6 rows over 4
    assert decode_local_shape(batch=8, heads=16, kv_heads=1) is None     # 1 key head over 2
    assert decode_kernel_fits(head_dim=64, heads=16, kv_heads=4, cache_len=64, batch=8)
    # 32 query heads per key head on one device: over the kernel's tile, as without a mesh.
    assert not decode_kernel_fits(head_dim=64, heads=64, kv_heads=2, cache_len=64, batch=8)
  with use_mesh_rules(_mesh(2, 2), dict(rules, act_kv_heads=())):  # key heads not split
    assert decode_local_shape(batch=8, heads=16, kv_heads=4) is None


def _sampler_with_kernel(monkeypatch, model, prompts, kernel, decide, mesh=None, rules=None):
  """Samples with the scanned XLA sampler, then unrolled with models/kv_cache.py's `kernel`
  (a models/decode_attention.py function's name) run in Pallas's interpreter wherever
  `decide` (standing in for `attention_kernels.decode_kernel`) says, as on a GPU; checks both
  give the same tokens and log-probs, and returns each traced call's (first argument's shape,
  layer)."""
  import functools
  from models import attention, sampler
  tokens, lengths = sampler.left_pad(prompts, 8, 0)

  def run(unroll):
    sample = sampler.make_sampler(model.spec, max_new_tokens=BLOCK_K - 8 + 1, eos_id=-1,
                                  temperature=1.0, mesh=mesh, rules=rules, unroll=unroll)
    return jax.device_get(sample(model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                 jax.random.PRNGKey(5)))

  plain = run(False)
  calls = []
  interpreted = functools.partial(getattr(kv_cache, kernel), interpret=True)
  monkeypatch.setattr(kv_cache, kernel, lambda x, *a, **kw: calls.append(
      (x.shape, kw["layer"])) or interpreted(x, *a, **kw))
  monkeypatch.setattr(attention, "decode_kernel", decide)
  with_kernel = run(True)
  np.testing.assert_array_equal(with_kernel["tokens"], plain["tokens"])
  np.testing.assert_allclose(with_kernel["log_probs"], plain["log_probs"], atol=1e-5)
  return calls


def test_sampler_with_the_kernel_equals_the_xla_sampler(monkeypatch):
  """The unrolled decode steps with attention by the kernel give the scanned XLA sampler's
  tokens and log-probs: the kernel reads each layer of the stacked cache in place at the
  right index, with the prompts' padding (the cache: one whole block of slots)."""
  from tests.models.test_sampler import PROMPTS, Model
  model = Model(num_heads=4, num_kv_heads=2, d_model=64)  # head_dim 16
  # The kernel that takes q / k / v apart (head_dim 16 is too narrow for the joined one).
  calls = _sampler_with_kernel(monkeypatch, model, PROMPTS, "decode_attention",
                               lambda joined=False, **kw: not joined)
  assert sorted({layer for _, layer in calls}) == [0, 1]  # once per layer, each its own


def test_sharded_sampler_with_the_kernel_equals_the_xla_sampler(monkeypatch):
  """On a data x fsdp x tensor mesh the kernel runs inside shard_map on each device's rows
  and heads of the stacked cache: the same tokens and log-probs as the scanned XLA sampler
  on the same mesh."""
  from parallel.rules import get_rules
  from tests.models.test_sampler import PROMPTS, Model
  model = Model(num_heads=4, num_kv_heads=2, d_model=64)  # head_dim 16
  calls = _sampler_with_kernel(monkeypatch, model, PROMPTS + [[2, 9]], "decode_attention",
                               decode_kernel_fits, _mesh(2, 2), get_rules("fsdp_tp"))
  # A device's row and the query heads of its key head.
  assert {shape for shape, _ in calls} == {(1, 1, 2, 16)}


@pytest.mark.parametrize("overrides, fsdp", [
    (dict(), 0),
    (dict(qkv_bias=True, rope_theta=500.0), 0),  # Qwen2-style biases
    (dict(sliding_window=5, attn_softcap=4.0), 0),
    (dict(), 2),  # rows split over data 4 x fsdp 2: the kernel on each device's row
])
def test_sampler_with_the_joined_kernel_equals_the_xla_sampler(monkeypatch, overrides, fsdp):
  """Unrolled and joined (the GPU default), a decode step hands the kernel the joined q / k /
  v projection, and it splits and rotates them itself: the same tokens and log-probs as the
  scanned XLA sampler."""
  from parallel.rules import get_rules
  from tests.models.test_sampler import PROMPTS, Model
  model = Model(num_heads=4, num_kv_heads=2, d_model=128, **overrides)  # head_dim 32
  prompts, mesh = PROMPTS + [[2, 9]], None
  if fsdp:
    prompts, mesh = prompts * 2, _mesh(fsdp, 1)
  calls = _sampler_with_kernel(monkeypatch, model, prompts, "decode_attention_joined",
                               decode_kernel_fits, mesh, get_rules("fsdp_tp") if fsdp else None)
  # Each layer's projection, of a device's rows.
  assert {shape for shape, _ in calls} == {(1 if fsdp else 4, 1, (4 + 2 * 2) * 32)}
  assert sorted({layer for _, layer in calls}) == [0, 1]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the kernel runs natively on a GPU")
def test_kernel_natively_on_a_gpu():
  """Compiled by Triton and run on the GPU, in bfloat16, over the stacked cache: both forms
  (the joined one against its run in the interpreter)."""
  c = _case(16, 8, 128, jnp.bfloat16, layers=2)
  want = _reference(c, layer=1)
  got = decode_attention(**c, index=jnp.int32(INDEX), layer=1, scale=0.3)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)
  qkv = jnp.asarray(np.random.default_rng(4).normal(size=(3, 1, 32 * 128)), jnp.bfloat16)
  cos, sin = rope_tables(jnp.asarray([[INDEX - 5], [INDEX - 40], [INDEX]]), 128, 10_000.0)
  args = (qkv, cos, sin, c["q_segments"], c["cache_k"], c["cache_v"], c["cache_segments"],
          jnp.int32(INDEX))
  kw = dict(heads=16, kv_heads=8, layer=1, scale=0.3)
  native = decode_attention_joined(*args, **kw)
  interpreted = decode_attention_joined(*args, **kw, interpret=True)
  for a, b in zip(native, interpreted):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=2e-2)

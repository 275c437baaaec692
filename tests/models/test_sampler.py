"""Sampler: KV-cached decoding equals full recomputation; padding, stops, sampling settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models  # noqa: F401
from models import kv_cache
from models.build import build_model_spec
from models.sampler import (compute_dtype_params, generate, left_pad, prompt_inputs,
                            sample_logits)
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from tests.models.test_decoder import STYLES, small_config

MAX_NEW = 8
PROMPTS = [[2, 17, 5, 40, 9, 33, 12], [2, 8, 61], [2, 50, 3, 3, 27, 14]]


class Model:
  """A small model with a jitted full forward (the reference every test compares to)."""

  def __init__(self, **overrides):
    self.cfg = small_config(**overrides)
    self.spec = build_model_spec(self.cfg)
    self.params = self.spec.init(jax.random.PRNGKey(0))
    self.forward = jax.jit(lambda p, t, pos, seg: self.spec.bind(p)(
        t, positions=pos, segment_ids=seg))
    self.cached = jax.jit(lambda p, t, pos, seg, cache: self.spec.bind(p)(
        t, positions=pos, segment_ids=seg, cache=cache))

  def full_logits(self, rows, length):
    """Logits `[batch, length, vocab]` of right-padded `rows`, each row alone in its segment."""
    tokens = np.zeros((len(rows), length), np.int32)
    seg = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
      tokens[i, :len(row)], seg[i, :len(row)] = row, 1
    positions = np.tile(np.arange(length, dtype=np.int32), (len(rows), 1))
    return np.asarray(self.forward(self.params, tokens, positions, seg))

  def greedy_by_recomputation(self, prompts, steps):
    rows = [list(p) for p in prompts]
    length = max(map(len, prompts)) + steps
    for _ in range(steps):
      logits = self.full_logits(rows, length)
      for i, row in enumerate(rows):
        row.append(int(np.argmax(logits[i, len(row) - 1])))
    return np.array([row[len(p):] for row, p in zip(rows, prompts)])

  def log_probs_of(self, prompts, completions):
    """log softmax of a full forward at each completion token `[batch, steps]`."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    logits = self.full_logits(rows, max(map(len, rows)))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return np.array([[logp[i, len(p) - 1 + t, tok] for t, tok in enumerate(c)]
                     for i, (p, c) in enumerate(zip(prompts, completions))])


@pytest.fixture(scope="module")
def llama():
  return Model()  # 4 heads over 2 KV heads: grouped-query attention


@pytest.fixture(scope="module")
def gpt2():
  return Model(**STYLES["gpt2"])


def test_left_pad_and_prompt_inputs():
  tokens, lengths = left_pad([[5, 6, 7], [9]], 4, pad_id=0)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
  np.testing.assert_array_equal(lengths, [3, 1])
  positions, seg = prompt_inputs(jnp.asarray(tokens), jnp.asarray(lengths))
  np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
  np.testing.assert_array_equal(seg, [[0, 1, 1, 1], [0, 0, 0, 1]])


@pytest.mark.parametrize("style", ["llama", "gpt2", "unrolled", "window"])
def test_cached_logits_equal_full_forward(style, llama, gpt2):
  # "window": sliding-window attention of 3 tokens, shorter than prompt and reply.
  model = {"llama": llama, "gpt2": gpt2}.get(style) or (
      Model(sliding_window=3) if style == "window" else Model(scan_layers=False))
  rng = np.random.default_rng(0)
  seqs = [rng.integers(4, 64, 10).tolist(), rng.integers(4, 64, 7).tolist()]
  prefill = [s[:-4] for s in seqs]  # 6 and 3 tokens, left-padded to 6
  tokens, lengths = left_pad(prefill, 6, pad_id=0)
  positions, seg = prompt_inputs(jnp.asarray(tokens), jnp.asarray(lengths))
  cache = kv_cache.init_cache(model.cfg, 2, 6 + 4)
  logits, cache = model.cached(model.params, tokens, positions, seg, cache)
  got = [[np.asarray(logits[i, 6 - len(p):]) for i, p in enumerate(prefill)]]
  for step in range(4):
    new = np.array([[s[len(p) + step]] for s, p in zip(seqs, prefill)], np.int32)
    pos = (lengths + step)[:, None]
    logits, cache = model.cached(model.params, new, pos, np.ones_like(pos), cache)
    got.append([np.asarray(logits[i]) for i in range(2)])
  assert int(cache.index) == 10
  full = model.full_logits(seqs, 10)
  for i, s in enumerate(seqs):
    row = np.concatenate([g[i] for g in got])
    np.testing.assert_allclose(row, full[i, :len(s)], atol=1e-5)


@pytest.mark.parametrize("style", ["llama", "gpt2", "moe_unscanned"])
def test_greedy_equals_argmax_of_recomputation(style, llama, gpt2):
  # moe_unscanned: each decode step merges its blocks anew (an MoE block stores its routing
  # losses, which a block made outside the decode loop's trace could not).
  model = {"llama": lambda: llama, "gpt2": lambda: gpt2, "moe_unscanned": lambda: Model(
      num_experts=4, experts_per_token=2, expert_mlp_dim=32, scan_layers=False)}[style]()
  out = generate(model.spec, model.params, PROMPTS, max_new_tokens=MAX_NEW, eos_id=-1,
                 prompt_bucket=8)
  expected = model.greedy_by_recomputation(PROMPTS, MAX_NEW)
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.mask, np.ones((3, MAX_NEW)))
  np.testing.assert_array_equal(out.lengths, [MAX_NEW] * 3)
  np.testing.assert_allclose(out.log_probs, model.log_probs_of(PROMPTS, expected), atol=1e-5)


def test_padding_and_batching_do_not_change_a_row(llama):
  alone = generate(llama.spec, llama.params, PROMPTS[1:2], max_new_tokens=MAX_NEW, eos_id=-1,
                   prompt_bucket=8)
  # Bucket 16: the row is left-padded by 13 instead of 5, next to longer prompts.
  batched = generate(llama.spec, llama.params, PROMPTS, max_new_tokens=MAX_NEW, eos_id=-1,
                     prompt_bucket=16)
  np.testing.assert_array_equal(batched.tokens[1], alone.tokens[0])
  np.testing.assert_allclose(batched.log_probs[1], alone.log_probs[0], atol=1e-5)


def test_sampling_settings_that_reduce_to_greedy(llama):
  greedy = generate(llama.spec, llama.params, PROMPTS, max_new_tokens=MAX_NEW, eos_id=-1,
                    prompt_bucket=8)
  kw = dict(max_new_tokens=MAX_NEW, eos_id=-1, prompt_bucket=8, rng=jax.random.PRNGKey(3))
  top1 = generate(llama.spec, llama.params, PROMPTS, temperature=1.5, top_k=1, **kw)
  nucleus = generate(llama.spec, llama.params, PROMPTS, temperature=1.5, top_p=1e-6, **kw)
  for out in (top1, nucleus):
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    # Log-probs are those of the unmodified distribution, not of the cut, heated one.
    np.testing.assert_allclose(out.log_probs, greedy.log_probs, atol=1e-6)


def test_sampled_log_probs_equal_full_forward(gpt2):
  kw = dict(max_new_tokens=MAX_NEW, eos_id=-1, prompt_bucket=8, temperature=1.0)
  out = generate(gpt2.spec, gpt2.params, PROMPTS, rng=jax.random.PRNGKey(7), **kw)
  np.testing.assert_allclose(out.log_probs, gpt2.log_probs_of(PROMPTS, out.tokens), atol=1e-5)
  again = generate(gpt2.spec, gpt2.params, PROMPTS, rng=jax.random.PRNGKey(7), **kw)
  other = generate(gpt2.spec, gpt2.params, PROMPTS, rng=jax.random.PRNGKey(8), **kw)
  np.testing.assert_array_equal(again.tokens, out.tokens)
  assert (other.tokens != out.tokens).any()
  # An untrained model is near uniform over 64 tokens: sampled completions are not greedy.
  assert (out.tokens != gpt2.greedy_by_recomputation(PROMPTS, MAX_NEW)).any()


def test_rows_stop_at_eos_and_stop_ids(llama):
  kw = dict(max_new_tokens=MAX_NEW, prompt_bucket=8)
  free = generate(llama.spec, llama.params, PROMPTS, eos_id=-1, **kw).tokens
  eos = int(free[0, 2])  # row 0's third greedy token becomes the end of sequence
  for stop_kw in (dict(eos_id=eos), dict(eos_id=-1, stop_ids=(60, eos))):
    out = generate(llama.spec, llama.params, PROMPTS, **stop_kw, **kw)
    for row in range(3):
      hits = np.flatnonzero(np.isin(free[row], [eos, 60] if "stop_ids" in stop_kw else [eos]))
      length = hits[0] + 1 if hits.size else MAX_NEW
      assert out.lengths[row] == length
      np.testing.assert_array_equal(out.mask[row], np.arange(MAX_NEW) < length)
      np.testing.assert_array_equal(out.tokens[row, :length], free[row, :length])
      np.testing.assert_array_equal(out.tokens[row, length:], 0)
      np.testing.assert_array_equal(out.log_probs[row, length:], 0.0)
    assert out.lengths[0] <= 3


def test_sample_logits_top_k_top_p_frequencies():
  logits = jnp.log(jnp.tile(jnp.array([[0.5, 0.3, 0.15, 0.05]]), (20000, 1)))

  def freq(seed=0, temperature=1.0, **kw):
    tokens = sample_logits(logits, jax.random.PRNGKey(seed), temperature=temperature, **kw)
    return np.bincount(np.asarray(tokens), minlength=4) / 20000

  np.testing.assert_allclose(freq(), [0.5, 0.3, 0.15, 0.05], atol=0.015)
  np.testing.assert_allclose(freq(top_k=2), [0.625, 0.375, 0, 0], atol=0.015)
  # Nucleus 0.6: the mass above the second token is 0.5 < 0.6, so it stays; above the third
  # it is 0.8, so the cut falls there.
  np.testing.assert_allclose(freq(top_p=0.6), [0.625, 0.375, 0, 0], atol=0.015)
  np.testing.assert_allclose(freq(top_p=0.85), np.array([0.5, 0.3, 0.15, 0]) / 0.95,
                             atol=0.015)
  # Temperature 2 samples proportionally to sqrt(p).
  hot = np.sqrt([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(freq(seed=1, temperature=2.0), hot / hot.sum(), atol=0.015)
  np.testing.assert_array_equal(sample_logits(logits[:2], None, temperature=0.0), [0, 0])


def test_learned_positions_length_bound(gpt2):
  with pytest.raises(ValueError, match="max_length 32"):
    generate(gpt2.spec, gpt2.params, [[2] * 20], max_new_tokens=13, eos_id=-1)
  with pytest.raises(ValueError, match="empty"):
    generate(gpt2.spec, gpt2.params, [[2], []], max_new_tokens=4, eos_id=-1)


def test_sharded_generation_equals_unsharded(llama):
  from ml_collections import ConfigDict
  mesh = make_mesh(ConfigDict(dict(data=-1, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1,
                                   dcn_tensor=1)))
  kw = dict(max_new_tokens=MAX_NEW, eos_id=-1, prompt_bucket=8)
  plain = generate(llama.spec, llama.params, PROMPTS, **kw)
  # 3 prompts on a batch split 4 ways (data 2 x fsdp 2): filled up and trimmed back.
  sharded = generate(llama.spec, llama.params, PROMPTS, mesh=mesh, rules=get_rules("fsdp_tp"),
                     **kw)
  np.testing.assert_array_equal(sharded.tokens, plain.tokens)
  np.testing.assert_allclose(sharded.log_probs, plain.log_probs, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(num_experts=4, experts_per_token=2,
                                                       expert_mlp_dim=32)])
def test_sampling_weights_in_the_compute_dtype_change_no_logit(overrides):
  # The sampler casts float32 matrices to bfloat16 once per call (less to read per decode
  # step); every layer casts them before use anyway, so the logits are bit-identical.
  cfg = small_config(dtype="bfloat16", tie_embeddings=False, **overrides)
  spec = build_model_spec(cfg)
  params = spec.init(jax.random.PRNGKey(0))
  cast = compute_dtype_params(spec, params)
  kinds = {jax.tree_util.keystr(path): leaf.dtype
           for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
  assert {d for k, d in kinds.items() if "lm_head" in k or "embed" in k} == {jnp.dtype(jnp.bfloat16)}
  assert {d for k, d in kinds.items() if "norm" in k or "router" in k} == {jnp.dtype(jnp.float32)}
  tokens = jnp.asarray([[2, 17, 5, 40, 9, 33, 12, 8]])
  positions, seg = jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32)
  logits = lambda p: np.asarray(spec.bind(p)(tokens, positions=positions, segment_ids=seg),
                                np.float32)
  np.testing.assert_array_equal(logits(cast), logits(params))
  # Nothing to gain from float32 compute: every param keeps its dtype.
  spec32 = build_model_spec(small_config(dtype="float32", **overrides))
  params32 = spec32.init(jax.random.PRNGKey(0))
  assert all(a.dtype == b.dtype for a, b in zip(
      jax.tree_util.tree_leaves(compute_dtype_params(spec32, params32)),
      jax.tree_util.tree_leaves(params32)))


@pytest.mark.parametrize("overrides, weights, tensor", [
    (dict(), "compute", 0),
    # Gemma 3's local / global layers: 3 layers of period 2, one scanned group and a tail.
    (dict(num_layers=3, sliding_window=3, sliding_window_pattern=2, rope_local_theta=100.0),
     "compute", 0),
    (dict(num_experts=4, experts_per_token=2, expert_mlp_dim=32), "compute", 0),
    (dict(tie_embeddings=False), "int8", 0),
    # Joined kernels with biases: GPT-2's (q, k, v; an ungated MLP), GeGLU's gate and up.
    (STYLES["gpt2"], "compute", 0),
    (dict(activation="geglu", qkv_bias=True, mlp_bias=True), "int8", 0),
    (dict(scan_layers=False), "compute", 0),
    # Sharded: FSDP only (kernels joined), and with tensor parallelism (not joined).
    (dict(), "compute", 1),
    (dict(), "compute", 2),
])
def test_unrolled_decode_equals_scanned(overrides, weights, tensor):
  """The decode steps with the layers unrolled, each from its own slice of the stack taken
  before the loop, q / k / v and gate / up joined into one product each unless tensor
  parallelism splits them (the GPU default), give the scanned sampler's tokens and log-probs."""
  from ml_collections import ConfigDict
  from models.sampler import make_sampler, sampler_platform, unrolls_decode
  model = Model(**overrides)
  mesh = rules = None
  if tensor:
    mesh = make_mesh(ConfigDict(dict(data=-1, fsdp=2, tensor=tensor, dcn_data=1, dcn_fsdp=1,
                                     dcn_tensor=1)))
    rules = get_rules("fsdp_tp")
  # Unrolled by default on GPU only.
  assert unrolls_decode(mesh) == (sampler_platform(mesh) == "gpu") and unrolls_decode(mesh, True)
  prompts = PROMPTS + [[2, 9]]  # 4 rows: the batch splits over data 2 x fsdp 2
  tokens, lengths = left_pad(prompts, 8, 0)
  out = {}
  for unroll in (False, True):
    sample = make_sampler(model.spec, max_new_tokens=MAX_NEW, eos_id=-1, temperature=1.0,
                          mesh=mesh, rules=rules, weights=weights, unroll=unroll)
    out[unroll] = jax.device_get(sample(model.params, jnp.asarray(tokens),
                                        jnp.asarray(lengths), jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(out[True]["tokens"], out[False]["tokens"])
  np.testing.assert_allclose(out[True]["log_probs"], out[False]["log_probs"], atol=1e-6)
  assert out[True]["mask"].sum() == 4 * MAX_NEW

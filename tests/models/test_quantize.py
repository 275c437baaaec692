"""Weight-only int8 sampling (models/quantize.py): per-channel scales against a hand-computed
reference, the contracted axes of every matrix kind, and the int8 sampler equal to a full
forward pass of the dequantized weights."""

import importlib.util
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models  # noqa: F401
from configs import pretrain
from models.build import build_model_spec
from models.layers import dense, join_outputs
from models.quantize import Int8Weight, contracted_axes, quantize_int8, quantize_params
from models.sampler import Sampler, generate, make_sampler, sampling_params
from parallel.mesh import make_mesh
from parallel.rules import batch_sharding, get_rules, tree_shardings
from parallel.tpu_topology import parse_topology, topology_devices
from tests.models.test_decoder import small_config
from tests.models.test_sampler import MAX_NEW, PROMPTS, Model

MOE = dict(num_experts=4, experts_per_token=2, expert_mlp_dim=32)
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")


def test_quantize_int8_against_a_hand_computed_reference():
  w = np.array([[0.5, -2.0, 0.0],
                [-1.0, 1.0, 0.0],
                [0.25, 0.6, 0.0]], np.float32)
  # Contract axis 0 (an `embed`-first matrix): one scale per column, max |w| / 127.
  got = quantize_int8(jnp.asarray(w), (0,), jnp.float32)
  np.testing.assert_allclose(np.asarray(got.scale), [[1.0 / 127, 2.0 / 127, 1.0]], rtol=1e-7)
  # round(w / scale): 0.5 * 127 = 63.5 -> 64 (half to even), 0.25 * 127 = 31.75 -> 32,
  # 0.6 * 127 / 2 = 38.1 -> 38; the all-zero column keeps scale 1 and q 0.
  want_q = np.array([[64, -127, 0], [-127, 64, 0], [32, 38, 0]], np.int8)
  np.testing.assert_array_equal(np.asarray(got.q), want_q)
  assert got.q.dtype == jnp.int8
  deq = np.asarray(got[...])
  np.testing.assert_allclose(deq, want_q * np.asarray(got.scale), rtol=1e-7)
  # Each element within half a step of its column's scale.
  assert (np.abs(deq - w) <= np.asarray(got.scale) / 2 + 1e-7).all()
  # Row scales (the embedding table's layout) and the compute-dtype cast.
  rows = quantize_int8(jnp.asarray(w), (1,), jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(rows.scale)[:, 0], [2 / 127, 1 / 127, 0.6 / 127],
                             rtol=1e-6)
  assert rows[...].dtype == jnp.bfloat16 and rows.astype(jnp.float32).dtype == jnp.float32


def test_contracted_axes_of_every_matrix_kind():
  cases = {
      ("layers", "embed", "heads", "head_dim"): (1,),       # q
      ("layers", "embed", "kv_heads", "head_dim"): (1,),    # k, v
      ("layers", "heads", "head_dim", "embed"): (1, 2),     # o
      ("layers", "embed", "mlp"): (1,),                     # gate, up
      ("layers", "mlp", "embed"): (1,),                     # down
      ("layers", "expert", "embed", "mlp"): (2,),           # MoE gate, up
      ("layers", "expert", "mlp", "embed"): (2,),           # MoE down
      ("vocab", "embed"): (1,),                             # embedding table / tied head
      ("embed", "vocab"): (0,),                             # LM head
      ("layers", "norm"): (), ("norm",): (),                # vectors
  }
  for names, axes in cases.items():
    assert contracted_axes(names) == axes, names


@pytest.mark.parametrize("tied,moe", [(False, False), (True, False), (False, True)])
def test_quantize_params_picks_the_matrices(tied, moe):
  cfg = small_config(dtype="bfloat16", tie_embeddings=tied, **(MOE if moe else {}))
  spec = build_model_spec(cfg)
  params = spec.init(jax.random.PRNGKey(0))
  held = sampling_params(spec, params, "int8")
  kinds = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      held, is_leaf=lambda x: isinstance(x, Int8Weight))}
  quantized = {k for k, v in kinds.items() if isinstance(v, Int8Weight)}
  for name in ("'q'", "'k'", "'v'", "'o'") + (() if moe else ("'gate'", "'up'", "'down'")):
    assert any(name in k for k in quantized), name
  assert (any(k == "['embed']" for k in quantized)) == tied
  assert not any("router" in k or "norm" in k for k in quantized)
  if moe:  # the router in float32, the experts in the compute dtype (KEEP_AXES)
    router = [v for k, v in kinds.items() if k.endswith("['router']")]
    assert len(router) == 1 and router[0].dtype == jnp.float32
    experts = [v for k, v in kinds.items() if "['mlp']" in k and "router" not in k]
    assert len(experts) == 3 and {v.dtype for v in experts} == {jnp.dtype(jnp.bfloat16)}
  if not tied:
    assert "['lm_head']" in quantized and kinds["['embed']"].dtype == jnp.bfloat16
  # The scales keep the stacked axes: the scanned layers slice them with their values.
  o = next(v for k, v in kinds.items() if k.endswith("['attn']['o']"))
  # o [layers, heads, head_dim, d] is held as [layers, heads x head_dim, d], as the product
  # reads it, with a scale per output feature.
  assert o.shape == (cfg.num_layers, cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.d_model)
  assert o.q.shape == (cfg.num_layers, cfg.d_model, cfg.d_model)
  assert o.scale.shape == (cfg.num_layers, 1, cfg.d_model)
  with pytest.raises(ValueError, match="unknown sampling weights 'fp4'"):
    sampling_params(spec, params, "fp4")


def _dequantized(spec, params):
  """The int8 model's weights as plain arrays: what the sampler computes with."""
  held = quantize_params(spec, params)
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, Int8Weight) else x, held,
                      is_leaf=lambda x: isinstance(x, Int8Weight))


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=True), MOE])
def test_int8_sampler_equals_full_forward_of_the_dequantized_weights(overrides):
  """Greedy int8 decoding == argmax recomputation with the dequantized weights, and its
  log-probs are theirs: the cached decode loop reads the Int8Weights it was given (the tied
  table both as the head and, row by row, as the lookup; beside MoE experts)."""
  llama = Model(**overrides)
  out = generate(llama.spec, llama.params, PROMPTS, max_new_tokens=MAX_NEW, eos_id=-1,
                 prompt_bucket=8, weights="int8")
  reference = Model(**overrides)
  reference.params = _dequantized(llama.spec, llama.params)
  expected = reference.greedy_by_recomputation(PROMPTS, MAX_NEW)
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_allclose(out.log_probs, reference.log_probs_of(PROMPTS, expected),
                             atol=1e-5)
  # A different model from the float one, close to it: the same log-probs within the
  # quantization error, not equal.
  exact = llama.log_probs_of(PROMPTS, expected)
  gap = np.abs(out.log_probs - exact).max()
  assert 1e-6 < gap < 0.05, gap
  # The Sampler keeps its weights setting for every call.
  kept = Sampler(llama.spec, weights="int8").generate(
      llama.params, PROMPTS, max_new_tokens=MAX_NEW, eos_id=-1, prompt_bucket=8)
  np.testing.assert_array_equal(kept.tokens, out.tokens)
  with pytest.raises(ValueError, match="unknown sampling weights"):
    Sampler(llama.spec, weights="int4")


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_int8_generation_equals_unsharded(tied):
  """On a data 2 x fsdp 2 x tensor 2 mesh (weights and their scales sharded as the params
  are; the tied table's rows gathered as int8) the int8 sampler generates what it generates on
  one device."""
  cfg = small_config(tie_embeddings=tied)
  spec = build_model_spec(cfg)
  params = spec.init(jax.random.PRNGKey(0))
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2, dcn_data=1,
                                                  dcn_fsdp=1, dcn_tensor=1)))
  rules = get_rules("fsdp_tp")
  kw = dict(max_new_tokens=MAX_NEW, eos_id=-1, prompt_bucket=8, weights="int8",
            temperature=1.0, rng=jax.random.PRNGKey(5))
  plain = generate(spec, params, PROMPTS, **kw)
  sharded = generate(spec, jax.device_put(params, tree_shardings(
      spec.logical_axes, spec.shapes, mesh, rules)), PROMPTS, mesh=mesh, rules=rules, **kw)
  np.testing.assert_array_equal(sharded.tokens, plain.tokens)
  np.testing.assert_allclose(sharded.log_probs, plain.log_probs, atol=1e-5)


def _unfused_int8_readers(text: str, weight_shapes: set) -> tuple[int, list[str]]:
  """(fusions outside other fusions that read int8 and write floats, those among them that
  hold no matrix product and write a weight-shaped array) of a compiled HLO module's text.
  `weight_shapes`: the sorted dims (1s dropped) of every matrix, whole and as 2-D."""
  computations = {}
  for block in text.split("\n\n"):
    match = re.match(r"(?:ENTRY )?%([\w.\-]+) ", block.strip())
    if match:
      computations[match.group(1)] = block
  nested = {callee for block in computations.values() for line in block.split("\n")
            if " fusion(" in line for callee in re.findall(r"calls=%([\w.\-]+)", line)}

  def holds_product(name, seen=()):
    block = computations.get(name, "")
    return "convolution(" in block or " dot(" in block or any(
        holds_product(c, seen + (name,)) for c in re.findall(r"calls=%([\w.\-]+)", block)
        if c not in seen)

  readers, stray = 0, []
  for name, block in computations.items():
    if name in nested:
      continue
    for line in block.split("\n"):
      match = re.search(r"= (\w+)\[([\d,]*)\][^\n]*? fusion\(.*calls=%([\w.\-]+)", line)
      if not match or match.group(1) not in ("bf16", "f32"):
        continue
      head = computations.get(match.group(3), "").split("\n")[0]
      if "s8[" in head.split("->")[0]:
        readers += 1
        dims = tuple(sorted(int(d) for d in match.group(2).split(",") if d and int(d) != 1))
        # (A lookup in the tied table dequantizes the rows it gathers: not weight-shaped.)
        if dims in weight_shapes and not holds_product(match.group(3)):
          stray.append(line.strip()[:160])
  return readers, stray


@needs_libtpu
@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=True), MOE])
def test_tpu_sampler_multiplies_int8_weights_in_place(overrides):
  """Compiled for a v5e chip from this host, the int8 sampler feeds every int8 weight (a
  layer's slice of the stacked array, the LM head) straight into its matrix product: no
  fusion writes a dequantized copy, so a decode step reads a byte per weight. (Scaling the
  weights rather than the products' outputs failed this for q, k, v and o.)"""
  config = pretrain.get_config("tiny")
  config.model.update(dict(d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
                           mlp_dim=512, vocab_size=512, dtype="bfloat16", scan_layers=True,
                           **overrides))
  devices = topology_devices(parse_topology("v5e:1x1"))
  mesh, rules = make_mesh(config.mesh, devices), get_rules(config.mesh.rules)
  spec = build_model_spec(config.model)
  shardings = tree_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        spec.shapes, shardings)
  tokens = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=batch_sharding(mesh, rules))
  lengths = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch_sharding(mesh, rules, ndim=1))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  sampler = make_sampler(spec, max_new_tokens=16, eos_id=-1, mesh=mesh, rules=rules,
                         weights="int8")
  weight_shapes = set()
  axes_of = jax.tree.leaves(spec.logical_axes, is_leaf=lambda x: isinstance(x, tuple))
  for names, shape in zip(axes_of, jax.tree.leaves(spec.shapes)):
    axes = contracted_axes(names)
    if axes:
      inner = [d for n, d in zip(names, shape.shape) if n not in ("layers", "expert")]
      weight_shapes.add(tuple(sorted(inner)))
      # A layer's experts, all of them: [experts, *inner].
      weight_shapes.add(tuple(sorted(d for n, d in zip(names, shape.shape) if n != "layers")))
      first = len(axes) if axes[0] == len(names) - len(inner) else len(inner) - len(axes)
      weight_shapes.add(tuple(sorted([math.prod(inner[:first]), math.prod(inner[first:])])))
  readers, stray = _unfused_int8_readers(
      sampler.lower(params, tokens, lengths, key).compile().as_text(), weight_shapes)
  assert readers >= 8, readers  # q, k, v, o, gate, up, down, the head; prefill and decode
  assert stray == []


def test_joined_int8_projections_multiply_as_the_separate_ones():
  """q [d, heads, head_dim] and k [d, kv_heads, head_dim] joined (the sampler's unrolled
  decode): one product whose columns are each projection's, per-output scales kept."""
  rng = np.random.default_rng(0)
  q = quantize_int8(jnp.asarray(rng.normal(size=(8, 4, 2)), jnp.float32), (0,), "float32")
  k = quantize_int8(jnp.asarray(rng.normal(size=(8, 2, 2)), jnp.float32), (0,), "float32")
  joined = join_outputs([q, k])
  assert isinstance(joined, Int8Weight) and joined.shape == (8, 12)
  np.testing.assert_array_equal(joined.dequantize(), np.concatenate(
      [np.asarray(q.dequantize()).reshape(8, 8), np.asarray(k.dequantize()).reshape(8, 4)], 1))
  x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  np.testing.assert_allclose(dense(x, joined), np.concatenate(
      [np.asarray(dense(x, q)).reshape(3, 8), np.asarray(dense(x, k)).reshape(3, 4)], 1),
      rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="mixed"):
    join_outputs([q, jnp.zeros((8, 2, 2))])

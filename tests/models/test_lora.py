"""LoRA: zero-initialised B is the base model, the merge is W + (alpha / r) A @ B, a train
step changes only the adapters, the reference shares the frozen base, and a LoRA run exports
merged to Hugging Face with logit parity."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import transformers
from flax import nnx

import models  # noqa: F401
from configs import pretrain
from models.build import build_model_spec
from configs.run_layout import write_run_config
from models.lora import lora_delta, make_lora_spec, parse_targets
from objectives.reductions import finalize_metrics
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from scripts.evaluate import evaluate_run
from tests.models import hf_parity as hp
from training.checkpoint import Checkpointer
from training.hf_runs import export_hf, save_params
from training.loop import train_and_evaluate
from training.optimizer import make_optimizer
from training.registry import get_loss_fn, get_stage
from training.runs import load_model, load_params
from training.setup import build_setup
from training.stage import FrozenModel
from training.state import create_train_state
from training.step import LORA_BASE, make_train_step


def tiny_model(vocab=64, **kw):
  config = pretrain.get_config("tiny")
  config.model.update(dict(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, mlp_dim=48, max_length=32, tie_embeddings=False))
  config.model.update(kw)
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  config.lora.update(dict(enabled=True, rank=4, alpha=8.0))
  return config


@pytest.fixture(scope="module")
def setup():
  config = tiny_model()
  base_spec = build_model_spec(config.model)
  spec = make_lora_spec(base_spec, config.lora)
  base = jax.jit(base_spec.init)(jax.random.PRNGKey(0))
  adapters = jax.jit(spec.init)(jax.random.PRNGKey(1))
  return config, base_spec, spec, base, adapters


def random_b(spec, adapters, seed=2):
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x,
      adapters)


@jax.jit
def _positions(tokens):
  return jnp.tile(jnp.arange(tokens.shape[1]), (tokens.shape[0], 1))


def forward(model, tokens):
  # Params are bound outside jit; one jitted call per model keeps the eager op count low.
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, t: nnx.merge(graphdef, s)(
      t, positions=_positions(t), segment_ids=jnp.ones_like(t)))
  return run(state, tokens)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 10)))


def test_targets_shapes_and_axes(setup):
  _, base_spec, spec, _, adapters = setup
  q = spec.shapes["blocks"]["layers"]["attn"]
  assert q["q"]["a"].shape == (2, 32, 4) and q["q"]["b"].shape == (2, 4, 4, 8)
  assert q["o"]["a"].shape == (2, 4, 8, 4) and q["o"]["b"].shape == (2, 4, 32)
  down = spec.logical_axes["blocks"]["layers"]["mlp"]["down"]
  assert down == {"a": ("layers", "mlp", "lora_rank"), "b": ("layers", "lora_rank", "embed")}
  assert spec.scale == 2.0 and spec.heads == ()
  assert np.all(np.asarray(adapters["blocks"]["layers"]["mlp"]["up"]["b"]) == 0)
  with pytest.raises(ValueError, match="unknown"):
    parse_targets("q,embed")
  # Adapters: 2 layers x r 4 x (q 32+32, k 32+16, v 32+16, o 32+32, gate/up 32+48, down 48+32).
  assert sum(x.size for x in jax.tree.leaves(spec.shapes)) == 2 * 4 * (64 + 48 + 48 + 64 +
                                                                      3 * 80)
  # Base: embed + lm_head 2 x 64 x 32, final norm 32, per layer 7744 (q, k, v, o, MLP, norms).
  assert sum(x.size for x in jax.tree.leaves(base_spec.shapes)) == 4096 + 32 + 2 * 7744


def test_zero_b_equals_the_base_model(setup):
  _, base_spec, spec, base, adapters = setup
  merged = spec.merge(base, adapters)
  jax.tree.map(np.testing.assert_array_equal, merged, base)
  np.testing.assert_array_equal(forward(spec.bind(adapters, base), TOKENS),
                                forward(base_spec.bind(base), TOKENS))


def test_merge_is_w_plus_scaled_low_rank_product(setup):
  _, _, spec, base, adapters = setup
  adapters = random_b(spec, adapters)
  merged = spec.merge(base, adapters)
  for name, n_in in (("q", 1), ("o", 2)):
    w = np.asarray(base["blocks"]["layers"]["attn"][name])
    a = np.asarray(adapters["blocks"]["layers"]["attn"][name]["a"])
    b = np.asarray(adapters["blocks"]["layers"]["attn"][name]["b"])
    for layer in range(2):
      a2 = a[layer].reshape(-1, 4)
      b2 = b[layer].reshape(4, -1)
      want = w[layer] + 2.0 * (a2 @ b2).reshape(w[layer].shape)
      np.testing.assert_allclose(merged["blocks"]["layers"]["attn"][name][layer], want,
                                 rtol=1e-6, atol=1e-6)
  # The merged weight's projection equals the LoRA forward x W + (x A) B * scale.
  x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
  w = np.asarray(base["blocks"]["layers"]["attn"]["q"][0])
  a = np.asarray(adapters["blocks"]["layers"]["attn"]["q"]["a"][0])
  b = np.asarray(adapters["blocks"]["layers"]["attn"]["q"]["b"][0])
  lora_forward = np.einsum("nd,dhk->nhk", x, w) + 2.0 * np.einsum("nr,rhk->nhk", x @ a, b)
  np.testing.assert_allclose(np.einsum("nd,dhk->nhk", x, merged["blocks"]["layers"]["attn"][
      "q"][0]), lora_forward, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(forward(spec.bind(adapters, base), TOKENS) - forward(
      spec.base.bind(base), TOKENS)).max()) > 1e-3


def test_dropout_drops_adapter_inputs_and_is_off_without_rng(setup):
  config, base_spec, _, base, adapters = setup
  lora_cfg = ml_collections.ConfigDict(dict(config.lora.to_dict(), dropout=0.5, targets="up"))
  spec = make_lora_spec(base_spec, lora_cfg)
  adapters = random_b(spec, jax.jit(spec.init)(jax.random.PRNGKey(1)))
  w = np.asarray(base["blocks"]["layers"]["mlp"]["up"])
  full = np.asarray(spec.merge(base, adapters)["blocks"]["layers"]["mlp"]["up"]) - w
  dropped = np.asarray(spec.merge(base, adapters, jax.random.PRNGKey(3))["blocks"]["layers"][
      "mlp"]["up"]) - w
  # Each input feature's adapter row is either dropped (0) or kept and scaled by 1 / (1 - p).
  kept = np.abs(dropped).sum(-1) > 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(dropped[kept], 2.0 * full[kept], rtol=1e-5, atol=1e-6)


def batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, (4, 17)).astype(np.int32)
  seg = np.ones((4, 16), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=seg.astype(np.float32),
              segment_ids=seg, positions=np.tile(np.arange(16), (4, 1)).astype(np.int32))


def test_train_step_changes_only_adapters(setup, tmp_path):
  config, base_spec, spec, base, _ = setup
  save_params(str(tmp_path), base)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  rules = get_rules(config.mesh.rules)
  base_params = load_params(str(tmp_path), base_spec, mesh, rules, shapes=spec.base_shapes,
                            logical_axes=spec.base_logical_axes)
  base_shardings = jax.tree.map(lambda a: a.sharding, base_params)
  optimizer, schedule = make_optimizer(config.optimizer, 10)
  state, shardings = create_train_state(spec, optimizer, mesh, rules, seed=0)
  before = jax.device_get(state["params"])
  frozen = {LORA_BASE: base_params}
  step = make_train_step(spec, get_loss_fn("clm"), optimizer, schedule, config.objective,
                         mesh=mesh, rules=rules, shardings=shardings,
                         frozen_shardings={LORA_BASE: base_shardings})
  losses = []
  for seed in range(3):
    state, metrics = step(state, batch(seed), frozen)
    losses.append(finalize_metrics(metrics)["loss"])
  after = jax.device_get(state["params"])
  assert jax.tree.structure(after) == jax.tree.structure(spec.shapes)
  for path, leaf in jax.tree_util.tree_leaves_with_path(after):
    assert not np.array_equal(leaf, _at(before, path)), jax.tree_util.keystr(path)
  # The frozen base is untouched (never in the state, not donated).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               base_params, base)
  assert np.isfinite(losses).all() and losses[-1] != losses[0]


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_reference_shares_the_frozen_base(setup, tmp_path):
  config, _, spec, base, _ = setup
  save_params(str(tmp_path), base)
  config = config.copy_and_resolve_references()
  config.init_from = str(tmp_path)
  stage = dataclasses.replace(get_stage("clm"), frozen_models=lambda c: {
      "reference": FrozenModel(c.model, os.path.join(str(tmp_path), "checkpoints"))})
  run = build_setup(config, stage, devices=jax.devices()[:1])
  frozen = run.load_frozen()
  assert frozen.params["reference"] is frozen.params[LORA_BASE]
  assert set(frozen.specs) == {"reference"}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               frozen.params[LORA_BASE], {k: base[k] for k in spec.base_shapes})


def test_lora_run_trains_adapters_and_exports_merged(tmp_path):
  """A 3-step LoRA pretraining run from a base checkpoint; exported merged to HF Llama, its
  logits equal the adapted model's."""
  config = tiny_model(vocab=384)
  config.data.update(dict(tiny_world_train_docs=300, tiny_world_eval_docs=20, seq_len=32,
                          global_batch_size=4, tokenizer_vocab_size=384))
  config.train.update(dict(steps=3, log_every=3, eval_every=3, eval_steps=1))
  config.checkpoint.update(dict(every_steps=3, async_save=False))
  config.optimizer.update(dict(warmup_steps=1, lr=3e-2))
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))   # adapters sharded like their weights
  base_spec = build_model_spec(config.model)
  base = jax.jit(base_spec.init)(jax.random.PRNGKey(5))
  base_dir = str(tmp_path / "base")
  save_params(base_dir, base)
  base_config = config.copy_and_resolve_references()
  base_config.lora.enabled = False
  write_run_config(base_dir, base_config, "decoder")
  config.init_from = base_dir
  final = train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(final["eval/loss"])
  spec = make_lora_spec(base_spec, config.lora)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  adapters = Checkpointer.restore_params(str(tmp_path / "run"), jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), spec.shapes))
  assert float(np.abs(np.asarray(adapters["blocks"]["layers"]["attn"]["q"]["b"])).max()) > 0
  # Loaded as the model it trained (training/runs.py): the adapters merged onto the base.
  loaded = load_model(str(tmp_path / "run"), mesh=make_mesh(config.mesh),
                      rules=get_rules(config.mesh.rules), with_tokenizer=False)
  assert loaded.kind == "decoder" and loaded.spec.shapes.keys() == base.keys()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               loaded.params, spec.merge(base, adapters))
  # scripts.evaluate on the LoRA run (its checkpoint holds adapters only): its last eval.
  figures = evaluate_run(str(tmp_path / "run"), max_batches=config.train.eval_steps)
  assert figures["eval/loss"] == pytest.approx(final["eval/loss"], abs=1e-5)
  assert figures["eval/accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-6)
  export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens, mask, positions = hp.padded_batch(384)
  ours = np.asarray(spec.bind(adapters, base)(jnp.asarray(tokens), positions=jnp.asarray(
      positions), segment_ids=jnp.asarray(mask)))
  ref = hp.hf_logits(hf_model, tokens, mask)
  assert np.abs(ours[mask > 0] - ref[mask > 0]).max() < hp.TOL


def test_reward_head_is_trained_in_full_next_to_adapters():
  config = tiny_model()
  base_spec = build_model_spec(config.model, "reward")
  spec = make_lora_spec(base_spec, config.lora)
  assert spec.heads == ("score",) and "score" not in spec.base_shapes
  assert spec.shapes["score"]["kernel"].shape == (32, 1)
  base = {k: v for k, v in jax.jit(base_spec.init)(jax.random.PRNGKey(0)).items()
          if k != "score"}
  trained = jax.jit(spec.init)(jax.random.PRNGKey(1))
  trained["score"]["kernel"] = jnp.full((32, 1), 0.5)
  merged = spec.merge(base, trained)
  np.testing.assert_array_equal(merged["score"]["kernel"], 0.5)
  np.testing.assert_array_equal(merged["embed"], base["embed"])

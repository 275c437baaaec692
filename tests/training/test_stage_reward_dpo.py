"""Reward-model and DPO-family stages: packed == unpacked, the reference cache, short runs."""

import math
import os

import jax
import ml_collections
import numpy as np
import pytest

import models  # noqa: F401
from configs import dpo as dpo_config
from configs import reward as reward_config
from data import tiny_world
from data.preferences import make_preference_dataset
from data.tokenizer import Tokenizer, train_sentencepiece
from models.build import build_model_spec
from objectives.pairs import pair_mask, segment_last, split_pairs
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.checkpoint import Checkpointer
from training.loop import train_and_evaluate
from training.metrics import read_metrics
from training.stages import dpo as dpo_stage
from training.registry import get_stage
from training.stages import reward as reward_stage
from training.stages.reference_cache import ReferenceCache, pair_log_probs

VOCAB = 384
ROWS = 12  # every batch below is padded to 12 rows: one compile per loss function


def shrink(config, base_dir, steps=3):
  config.init_from = base_dir
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                           vocab_size=VOCAB))
  config.data.update(dict(tiny_task_train_records=64, tiny_task_eval_records=12, seq_len=160,
                          global_batch_size=8, tokenizer_vocab_size=VOCAB, pack_bins=4))
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  config.train.update(dict(steps=steps, log_every=1, eval_every=steps, eval_steps=4))
  config.checkpoint.update(dict(every_steps=100, async_save=False))
  config.optimizer.update(dict(warmup_steps=1, lr=1e-2))
  return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A stand-in SFT run: its tokenizer and a checkpoint of random decoder params."""
  base = tmp_path_factory.mktemp("base")
  train_sentencepiece(tiny_world.generate_documents("train", 1500),
                      str(base / "tokenizer" / "spm"), VOCAB)
  spec = build_model_spec(shrink(dpo_config.get_config("tiny"), str(base)).model)
  params = spec.init(jax.random.PRNGKey(123))
  with Checkpointer(str(base / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(10, {"params": params}, force=True)
  tokenizer = Tokenizer.load(str(base / "tokenizer" / "spm.model"))
  return str(base), params, tokenizer, spec


def _rows(config, tokenizer, workdir, *, packed, kind="preferences", shift=True):
  """All eval examples in one batch of ROWS rows (packed several to a row, or one per row)."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.packing = packed
  batches = list(make_preference_dataset(data, tokenizer, kind=kind, split="eval",
                                         batch_size=ROWS, shift=shift, workdir=workdir))
  assert len(batches) == 1
  return batches[0]


def _per_example(batch, per_pair):
  ids, _ = split_pairs(segment_last(batch["example_ids"], batch["segment_ids"]))
  mask = np.asarray(pair_mask(batch["sides"], batch["segment_ids"]))
  return dict(zip(np.asarray(ids)[mask].tolist(), np.asarray(per_pair)[mask].tolist()))


def _assert_same(packed, unpacked, forward):
  (per_a, metrics_a), (per_b, metrics_b) = forward(packed), forward(unpacked)
  a, b = _per_example(packed, per_a), _per_example(unpacked, per_b)
  assert sorted(a) == list(range(12)) == sorted(b)
  np.testing.assert_allclose([a[i] for i in range(12)], [b[i] for i in range(12)],
                             rtol=2e-5, atol=2e-5)
  for key in metrics_a:
    np.testing.assert_allclose(metrics_a[key][0], metrics_b[key][0], rtol=2e-5, atol=2e-5)
    assert float(metrics_a[key][1]) == float(metrics_b[key][1])
  return metrics_a


def test_dpo_on_packed_pairs_equals_unpacked(base_run, tmp_path):
  base_dir, base_params, tokenizer, spec = base_run
  config = shrink(dpo_config.get_config("tiny"), base_dir)
  packed = _rows(config, tokenizer, str(tmp_path), packed=True)
  unpacked = _rows(config, tokenizer, str(tmp_path), packed=False)
  assert packed["segment_ids"].max() > 2 and unpacked["segment_ids"].max() == 2
  policy = spec.init(jax.random.PRNGKey(7))
  forward = jax.jit(lambda p, r, b: dpo_stage.dpo_forward(
      spec.bind(p), b, None, config.objective, {"reference": spec.bind(r)}))
  metrics = _assert_same(packed, unpacked, lambda b: forward(policy, base_params, b))
  assert float(metrics["rewards/margins"][0]) != 0.0  # policy and reference differ


def test_reward_on_packed_pairs_equals_unpacked(base_run, tmp_path):
  base_dir, _, tokenizer, _ = base_run
  config = shrink(reward_config.get_config("tiny"), base_dir)
  spec = build_model_spec(config.model, "reward")
  params = spec.init(jax.random.PRNGKey(3))
  forward = jax.jit(lambda p, b: reward_stage.reward_forward(spec.bind(p), b, None,
                                                             config.objective, {}))
  packed = _rows(config, tokenizer, str(tmp_path), packed=True, shift=False)
  unpacked = _rows(config, tokenizer, str(tmp_path), packed=False, shift=False)
  metrics = _assert_same(packed, unpacked, lambda b: forward(params, b))
  assert float(metrics["loss"][1]) == 12.0


def test_kto_with_policy_equal_to_reference(base_run, tmp_path):
  """r = 0 and z0 = 0: every example's loss is lambda / 2 (lambda_D 1, lambda_U 3)."""
  base_dir, base_params, tokenizer, spec = base_run
  config = shrink(dpo_config.get_config("tiny,kto"), base_dir)
  config.objective.kto_undesirable_weight = 3.0
  batch = _rows(config, tokenizer, str(tmp_path), packed=True, kind="feedback")
  model = spec.bind(base_params)
  per_example, metrics = jax.jit(lambda b: dpo_stage.dpo_forward(
      model, b, None, config.objective, {"reference": model}))(batch)
  desirable, _ = split_pairs(segment_last(batch["desirable"], batch["segment_ids"]))
  mask = np.asarray(pair_mask(batch["sides"], batch["segment_ids"]))
  np.testing.assert_allclose(np.asarray(per_example)[mask],
                             np.where(np.asarray(desirable)[mask] > 0, 0.5, 1.5), atol=1e-6)
  assert float(metrics["kl"][0]) == 0.0 and float(metrics["loss"][1]) == 12.0


@pytest.fixture(scope="module")
def dpo_run(base_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dpo"))
  config = shrink(dpo_config.get_config("tiny"), base_run[0])
  return workdir, config, train_and_evaluate(config, workdir)


def test_dpo_run_end_to_end_with_cached_reference(base_run, dpo_run, tmp_path):
  base_dir, base_params, tokenizer, spec = base_run
  workdir, config, final = dpo_run
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3]
  # Step 1's metrics come from the initial params, equal to the reference: the policy's own
  # log-probs cancel the cached ones, so the loss is log 2 and every margin 0.
  assert records[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
  assert records[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-4)
  assert records[-1]["train/loss"] < records[0]["train/loss"]
  for key in ("eval/rewards/accuracies", "eval/pairs/accuracy"):
    assert 0.0 <= final[key] <= 1.0
  assert final["eval/pairs/accuracy"] == pytest.approx(final["eval/rewards/accuracies"])
  # The cached table equals the reference's log-probs computed in a step.
  cache = ReferenceCache(workdir)
  table = cache.load("eval")
  assert cache.load("train").shape == (64, 2) and table.shape == (12, 2)
  unpacked = _rows(config, tokenizer, str(tmp_path), packed=False)
  seqs = jax.jit(lambda p, b: pair_log_probs(spec.bind(p), b))(base_params, unpacked)
  firsts = _per_example(unpacked, seqs.first)
  seconds = _per_example(unpacked, seqs.second)
  np.testing.assert_allclose(table, [[firsts[i], seconds[i]] for i in range(12)],
                             rtol=1e-5, atol=1e-4)
  # Preparing again (a resumed run) reuses the tables: the fingerprint still matches.
  stamp = os.path.getmtime(cache.path("train"))
  # On another mesh (one device): the fingerprint does not depend on the sharding.
  mesh = make_mesh(ml_collections.ConfigDict(dict(config.mesh.to_dict(), data=1, fsdp=1,
                                                  tensor=1)), jax.devices()[:1])
  get_stage("dpo").prepare(config, tokenizer, mesh=mesh, rules=get_rules("fsdp_tp"),
                           workdir=workdir)
  assert os.path.getmtime(cache.path("train")) == stamp


def test_reward_run_end_to_end_from_a_decoder(base_run, tmp_path):
  base_dir, base_params, _, _ = base_run
  workdir = str(tmp_path / "reward")
  config = shrink(reward_config.get_config("tiny"), base_dir, steps=2)
  config.train.eval_steps = 2
  final = train_and_evaluate(config, workdir)
  assert 0.0 <= final["eval/accuracy"] <= 1.0 and np.isfinite(final["eval/loss"])
  for key in ("eval/margin", "eval/chosen", "eval/rejected", "train/accuracy"):
    assert key in final
  spec = build_model_spec(config.model, "reward")
  params = Checkpointer.restore_params(workdir, spec.shapes)
  assert params["score"]["kernel"].shape == (32, 1)
  # Two Adam steps of lr <= 1e-2 move every decoder param by < 0.03 from the base run's.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params["blocks"],
                       base_params["blocks"])
  assert max(jax.tree.leaves(moved)) < 0.03

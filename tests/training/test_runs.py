"""training/runs.py: one way to load a run's model, sharded over any mesh."""

import jax
import ml_collections
import numpy as np
import pytest

import models  # noqa: F401
from configs import reward as reward_config
from configs.run_layout import write_run_config
from models.build import build_model_spec
from parallel.mesh import make_mesh
from parallel.rules import get_rules
from training.checkpoint import Checkpointer
from training.registry import STAGES
from training.runs import load_model, run_model_kind


def test_kinds_of_runs_written_before_the_kind_was_recorded_follow_the_registry():
  for name, stage in STAGES.items():
    legacy = ml_collections.ConfigDict({"objective": {"name": name}})
    assert run_model_kind(legacy) == stage.model_kind, name
  recorded = ml_collections.ConfigDict({"objective": {"name": "mlm"}, "model_kind": "decoder"})
  assert run_model_kind(recorded) == "decoder"


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
  config = reward_config.get_config("tiny")
  config.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, mlp_dim=48))
  workdir = str(tmp_path_factory.mktemp("reward"))
  spec = build_model_spec(config.model, "reward")
  params = jax.jit(spec.init)(jax.random.PRNGKey(3))
  with Checkpointer(f"{workdir}/checkpoints", async_save=False) as ckpt:
    ckpt.save(5, {"params": params}, force=True)
  write_run_config(workdir, config, "reward")
  return workdir, config, jax.device_get(params)


def test_load_model_builds_the_recorded_kind_sharded_over_the_mesh(reward_run):
  workdir, config, params = reward_run
  config.mesh.update(dict(data=1, fsdp=4, tensor=2))
  mesh = make_mesh(config.mesh, jax.devices()[:8])
  model = load_model(f"{workdir}/checkpoints/5", mesh=mesh, rules=get_rules("fsdp_tp"),
                     with_tokenizer=False)
  assert model.kind == "reward" and model.tokenizer is None
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params,
               params)
  embed = model.params["embed"]
  assert embed.sharding.mesh.shape == mesh.shape
  assert embed.addressable_shards[0].data.size < embed.size  # sharded, not replicated


def test_load_model_reads_the_decoder_under_a_reward_head(reward_run):
  workdir, _, params = reward_run
  model = load_model(workdir, kind="decoder", mesh=make_mesh(
      reward_config.get_config("tiny").mesh, jax.devices()[:1]), rules=get_rules("fsdp_tp"),
      with_tokenizer=False)
  assert "score" not in model.params and "score" in params
  np.testing.assert_array_equal(np.asarray(model.params["final_norm"]["scale"]),
                                params["final_norm"]["scale"])

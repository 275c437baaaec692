"""compile_check: TPU topology names; every stage's programs compiled for a small TPU slice
without a TPU (libtpu's topology description), with their memory against the chip's HBM,
FLOPs and collectives (checked on a program whose collectives are known by construction);
the batch search on a budget whose answer is known; and the RL minibatch shapes against what
the algorithms really hand the train step."""

import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import cpt, distill, dpo, grpo, mlm, online_dpo, ppo, pretrain, reward, sft
from data.conversation import Prompt
from models.build import count_params
from models.lora import trained_count
from parallel.gpu_target import cuda_plugin_installed, parse_gpu_target
from parallel.hlo_stats import collective_stats
from parallel.tpu_topology import parse_topology, topology_devices
from scripts.benchmarks.generation import generation_flops
from scripts.compile_check import (_parse_out_of_memory, check, check_stage, device_memory,
                                   find_batch, lower_train_step, measure)
from training.programs import stage_programs
from training.registry import get_stage
from training.rl.algorithms import get_algorithm
from training.rl.rollout import Rollout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")
SHRINK = ["--config.model.d_model=64", "--config.model.num_layers=2", "--config.model.mlp_dim=128",
          "--config.model.vocab_size=256", "--config.data.seq_len=64"]


@pytest.mark.parametrize("text, name, accelerator, chips, hbm_gib", [
    ("v5e:16x16", "v5e:16x16", "v5litepod-256", 256, 16),
    ("v5litepod-256", "v5e:16x16", "v5litepod-256", 256, 16),
    ("v5p-128", "v5p:4x4x4", "v5p-128", 64, 95),
    ("v4-32", "v4:2x2x4", "v4-32", 16, 32),
    ("v6e:8x16", "v6e:8x16", "v6e-128", 128, 32),
    ("v5e-8", "v5e:2x4", "v5litepod-8", 8, 16),
])
def test_parse_topology(text, name, accelerator, chips, hbm_gib):
  target = parse_topology(text)
  assert (target.topology_name, target.accelerator_type, target.chips) == (name, accelerator,
                                                                           chips)
  assert target.hbm_bytes == hbm_gib * 2**30
  assert parse_topology(text, num_slices=2).chips == 2 * chips


def test_parse_topology_errors():
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    parse_topology("v9:4x4")
  with pytest.raises(ValueError, match="v5p slices are 3-D grids"):
    parse_topology("v5p:4x4")
  with pytest.raises(ValueError, match="expected gen:AxB"):
    parse_topology("a big pod")


def test_parse_gpu_targets():
  """GPU hosts: a count (whole hosts of eight past eight) or hosts x GPUs; the budget is the
  share of each GPU's memory JAX's allocator takes, the run's own setting."""
  eight = parse_gpu_target("h200:8", {})
  assert (eight.hosts, eight.per_host, eight.gpus) == (1, 8, 8)
  assert eight.hbm_bytes == int(151_397_597_184 * 0.75)
  assert (parse_gpu_target("h100:16", {}).hosts, parse_gpu_target("H100:4x8", {}).gpus) == (2, 32)
  assert parse_gpu_target("h200", {}).gpus == 1
  fuller = parse_gpu_target("h100:2", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"})
  assert fuller.hbm_bytes == int(85_520_809_984 * 0.95)
  assert parse_gpu_target("v5e:2x2", {}) is None  # a TPU topology
  with pytest.raises(ValueError, match="1 to 8 GPUs a host"):
    parse_gpu_target("h200:12", {})
  with pytest.raises(ValueError, match="expected h200:GPUS or h200:HOSTSxGPUS"):
    parse_gpu_target("h200:many", {})


@pytest.mark.skipif(not cuda_plugin_installed(), reason="compiling for a GPU needs JAX's CUDA "
                    "plugin (pip install -e .[gpu_aot])")
def test_cli_compiles_train_step_for_two_hosts_of_gpus():
  # Two hosts of two H100s, FSDP over all four: compiled under a GPU run's XLA flags.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  result = subprocess.run(
      [sys.executable, "-m", "scripts.compile_check", "--config", "configs/pretrain.py:tiny",
       "--topology", "h100:2x2", "--config.mesh.fsdp=4", "--config.mesh.data=1"] + SHRINK,
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("target      h100:2x2 (2 hosts x 2 NVIDIA H100 80GB HBM3; 0.75 ")
  summary = json.loads(lines[-1])
  assert summary["fits"] is True and summary["devices"] == 4
  assert summary["budget"] == int(85_520_809_984 * 0.75)
  (step,) = summary["programs"]
  assert step["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the weights
  # What its kernels move: the GEMMs, the rest, and the rest's time at 3.35 TB/s.
  traffic = step["traffic"]
  assert traffic["kernels"] > 0 and traffic["bandwidth"] == 3.35e12
  assert traffic["moved"]["gemm"] > 0 and traffic["moved"]["other"] > 0
  assert traffic["other_s"] == traffic["moved"]["other"] / 3.35e12
  assert any(line.startswith("  traffic ") for line in lines)


def test_parse_out_of_memory():
  message = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
             "memory required for HLO temporaries (16.90G) exceeds available HBM (15.75G).")
  got = _parse_out_of_memory(message)
  assert got["needed"] == int(16.90 * 2**30) and got["available"] == int(15.75 * 2**30)
  assert got["message"].startswith("Ran out of memory on HBM") and got["memory"] == "hbm"
  vmem = _parse_out_of_memory("RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:\nRan out of "
                              "memory in memory space vmem while allocating on stack for %f")
  assert vmem["memory"] == "vmem" and vmem["needed"] == vmem["available"] == 0
  assert _parse_out_of_memory("INTERNAL: something else") is None


@needs_libtpu
def test_cli_compiles_train_step_for_v5e_2x2():
  # A budget of 1 MiB per chip: it compiles, reports its memory, and does not fit.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TPU_"))}
  result = subprocess.run(
      [sys.executable, "-m", "scripts.compile_check", "--config", "configs/pretrain.py:tiny",
       "--topology", "v5e:2x2", "--hbm_gib", str(1 / 1024), "--config.mesh.data=2",
       "--config.mesh.tensor=2"] + SHRINK,
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0] == "target      v5e:2x2 (v5litepod-4), 4 chips: 4 x TPU v5 lite, 1.0 MiB " \
                     "per device"
  assert lines[1].startswith("stage       clm: mesh {'data': 2, 'fsdp': 1, 'tensor': 2}, rules "
                             "'fsdp_tp'; data.global_batch_size 16")
  assert lines[3] == "program     train_step: clm train step, 16 x 64 tokens"
  assert lines[5].strip().startswith("+ resident") and lines[5].endswith("DOES NOT FIT")
  assert lines[-2].startswith("verdict     DOES NOT FIT")
  summary = json.loads(lines[-1])
  assert summary["fits"] is False and summary["devices"] == 4
  # Embedding 256 x 64 (tied), final norm, and 2 layers of q, o 64x64, k, v 64x32 (2 of 4
  # heads), gate, up, down 64x128 and 2 norms; arguments hold this device's share of the state.
  layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
  assert summary["params"] == 256 * 64 + 64 + 2 * layer
  (step,) = summary["programs"]
  assert 0 < step["argument"] < 3 * 4 * summary["params"]
  assert step["total"] > 1 << 20 and step["peak"] == step["total"]  # all resident are arguments
  # Tensor parallelism reduces activations across the `tensor` axis.
  assert step["collectives"]["all-reduce"]["count"] > 0
  # libtpu only described the topology: nothing tried to start a TPU runtime.
  assert "TPU_" not in result.stderr and "libtpu" not in result.stderr


def test_a_lora_step_compiles_with_its_frozen_base_as_an_argument():
  """The AOT check builds LoRA runs like training does: adapters in the state, the frozen base
  (shapes only, nothing read) an argument of the step."""
  config = pretrain.get_config("tiny")
  config.model.update(dict(d_model=64, num_layers=2, mlp_dim=128, vocab_size=256))
  config.data.update(dict(seq_len=64, global_batch_size=4))
  config.mesh.update(dict(data=1))
  full = device_memory(lower_train_step(config, jax.devices()[:1])[0].compile())
  config.lora.update(dict(enabled=True, rank=4))
  lowered, setup = lower_train_step(config, jax.devices()[:1])
  lora = device_memory(lowered.compile())
  base = count_params(setup.base_spec.shapes)
  assert count_params(setup.spec.shapes) == trained_count(setup.spec) < base / 10
  # Full: params + Adam's two moments (+ step, rng). LoRA: the base once, adapters thrice.
  assert lora["argument"] < full["argument"] / 2
  assert lora["argument"] >= 4 * (base + 3 * trained_count(setup.spec))


@needs_libtpu
def test_multislice_fits():
  config = pretrain.get_config("tiny")
  config.model.update(dict(d_model=64, num_layers=2, mlp_dim=128, vocab_size=256))
  config.data.seq_len = 64
  config.mesh.update(dict(data=-1, dcn_data=2))
  with open(os.devnull, "w") as out:
    summary = check(config, topology="v5e:2x2", num_slices=2, out=out)
  assert summary["devices"] == 8 and summary["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert summary["fits"] is True and summary["budget"] == 16 * 2**30


# --- Every stage, every program ----------------------------------------------------------------

def _shrunk(module, preset, *, vocab=True, **fields):
  config = module.get_config(preset)
  config.model.update(dict(d_model=64, num_layers=2, mlp_dim=128, **(
      dict(vocab_size=256) if vocab else {})))
  if "rl" not in config:
    config.data.seq_len = 64
  config.mesh.update(dict(data=-1))
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def v5e_2x2():
  return topology_devices(parse_topology("v5e:2x2"))


STAGE_CASES = {
    "pretrain": (lambda: _shrunk(pretrain, "tiny"), {}, ["train_step"]),
    "cpt": (lambda: _shrunk(cpt, "tiny"), {}, ["train_step"]),
    "sft": (lambda: _shrunk(sft, "tiny"), {}, ["train_step"]),
    "mlm": (lambda: _shrunk(mlm, "tiny"), {}, ["train_step"]),
    "reward": (lambda: _shrunk(reward, "tiny"), {}, ["train_step"]),
    "dpo_cached": (lambda: _shrunk(dpo, "tiny"), {}, ["train_step", "reference_pass"]),
    "dpo_in_step": (lambda: _shrunk(dpo, "tiny", objective__reference_mode="in_step"), {},
                    ["train_step"]),
    "kto_cached": (lambda: _shrunk(dpo, "tiny,kto"), {}, ["train_step", "reference_pass"]),
    # The teacher run is not here: its shapes come from the tiny model preset.
    "distill": (lambda: _shrunk(distill, "tiny", vocab=False), {"teacher": "tiny"},
                ["train_step"]),
    "ppo": (lambda: _shrunk(ppo, "tiny", reward__model="runs/rm"), {"reward_model": "tiny"},
            ["sample", "reward_model", "log_probs", "update"]),
    "grpo": (lambda: _shrunk(grpo, "tiny"), {}, ["sample", "log_probs", "update"]),
    "online_dpo": (lambda: _shrunk(online_dpo, "tiny"), {}, ["sample", "log_probs", "update"]),
}


@needs_libtpu
@pytest.mark.parametrize("case", sorted(STAGE_CASES))
def test_every_stage_compiles_every_program(case, v5e_2x2):
  make, presets, names = STAGE_CASES[case]
  config = make()
  config.init_from = config.init_from or "runs/none"  # a path is named, never read
  stage, results = check_stage(config, v5e_2x2, 16 * 2**30, presets=presets)
  assert [r["name"] for r in results] == names
  for r in results:
    assert r["refused"] is None and r["fits"] is True, r
    assert r["peak"] == r["total"] + r["other_resident"] and r["temp"] >= 0
    # Compiled FLOPs against the benchmark's model count, both with a loop body once: the
    # same work up to what the count leaves out (norms, softmax, masks, the optimizer).
    assert 0.9 < r["compiled_flops"] / r["counted_flops"] < 2.5, r
  resident = {n: stage.resident_bytes(n) for n in stage.resident}
  if case == "ppo":  # policy + critic trained; reference and reward model frozen beside them
    assert set(resident) == {"params", "optimizer", "reference", "reward_model"}
    sample = results[0]
    assert sample["other_resident"] == sum(resident.values()) - resident["params"]
  if case.startswith(("dpo_cached", "kto")):  # before training: the reference alone
    assert results[1]["other_resident"] == 0
    assert results[1]["argument"] >= resident["reference"]
  if case == "dpo_in_step":
    assert "reference" in resident and results[0]["other_resident"] == 0


@needs_libtpu
def test_remat_shows_in_the_flops_ratio(v5e_2x2):
  """Full remat recomputes the forward pass inside the backward: more compiled FLOPs for the
  same model FLOPs (up to a third; less here, since the blockwise attention backward recomputes
  its probabilities under either policy: 1.18x measured on the tiny model)."""
  ratios = {}
  for policy in ("none", "full"):
    config = _shrunk(pretrain, "tiny")
    config.model.remat = policy
    stage = stage_programs(config, v5e_2x2)
    r = measure(stage.programs[0], stage, None)
    ratios[policy] = r["compiled_flops"] / r["counted_flops"]
  assert 1.1 < ratios["full"] / ratios["none"] < 1.45, ratios


def test_sampler_flops_are_the_generation_benchmarks():
  config = _shrunk(grpo, "tiny")
  stage = stage_programs(config, jax.devices()[:1])
  rl = config.rl
  assert stage.programs[0].model_flops == generation_flops(
      config.model, rl.prompts_per_iteration * rl.samples_per_prompt, rl.max_prompt_len,
      rl.max_new_tokens)


# --- Collectives, known by construction -----------------------------------------------------------

@needs_libtpu
def test_collectives_of_a_pure_fsdp_program(v5e_2x2):
  """Weights sharded over 4 devices, gathered whole before each matmul (by hand, under
  shard_map): one gather for the first, one per step of a 5-step layer scan, one psum."""
  mesh = Mesh(np.array(v5e_2x2), ("fsdp",))

  def body(x, w, stacked):
    h = x @ jax.lax.all_gather(w, "fsdp", axis=0, tiled=True)            # [2, 64] @ [64, 32]
    def layer(h, w_layer):
      return jnp.tanh(h @ jax.lax.all_gather(w_layer, "fsdp", axis=0, tiled=True)), None
    h, _ = jax.lax.scan(layer, h, stacked)                                  # 5 x [32, 32]
    return jax.lax.psum(jnp.sum(h.astype(jnp.float32)), "fsdp")

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("fsdp"), P("fsdp"), P(None, "fsdp")),
                             out_specs=P()))
  shaped = lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.bfloat16,
                                                    sharding=NamedSharding(mesh, spec))
  compiled = fn.lower(shaped((8, 64), P("fsdp")), shaped((64, 32), P("fsdp")),
                      shaped((5, 32, 32), P(None, "fsdp"))).compile()
  stats = collective_stats(compiled.as_text())
  assert stats.static["all-gather"] == 2 and stats.loops == 1 and stats.unbounded_loops == 0
  assert stats.count == {"all-gather": 6, "reduce-scatter": 0, "all-reduce": 1,
                         "all-to-all": 0, "collective-permute": 0}
  assert stats.bytes["all-gather"] == 2 * (64 * 32 + 5 * 32 * 32)   # bf16, whole weights
  assert stats.bytes["all-reduce"] == 4
  assert stats.summary() == "all-gather 6 x (14.0 KiB), all-reduce 1 x (4 B)"


# --- find_batch ---------------------------------------------------------------------------------

@needs_libtpu
def test_find_batch_on_a_budget_between_two_batches(v5e_2x2):
  """Batches are multiples of 4 (the data axis); with a budget between the peaks of 8 and 12
  rows the search must answer 8: probes 4, 8, 16 (doubling), then 12 (bisecting)."""
  config = _shrunk(pretrain, "tiny")
  config.data.seq_len = 128
  peaks = {}
  for batch in (8, 12):
    config.data.global_batch_size = batch
    stage = stage_programs(config, v5e_2x2)
    peaks[batch] = measure(stage.programs[0], stage, None)["peak"]
  assert peaks[12] > peaks[8]
  found = find_batch(config, v5e_2x2, (peaks[8] + peaks[12]) // 2, presets={},
                     say=lambda text: None)
  assert found["knob"] == "data.global_batch_size" and found["unit"] == 4
  assert found["largest"] == 8
  assert [(p["batch"], p["fits"]) for p in found["probes"]] == [
      (4, True), (8, True), (16, False), (12, False)]
  assert found["compiles"] == 4 and found["probes"][1]["peak"] == peaks[8]


@needs_libtpu
def test_a_batch_that_does_not_split_over_the_mesh_is_a_usage_error():
  # 6 rows over v5e:2x2's 4 batch shards: one line naming the key and the batches that split,
  # before anything compiles (not JAX's IndivisibleError from inside the lowering).
  config = _shrunk(sft, "tiny")
  config.data.global_batch_size = 6
  with pytest.raises(app.UsageError, match=r"config.data.global_batch_size=6 does not split "
                     r"over the mesh's 4 batch shards .*use 4 or 8"):
    check(config, topology="v5e:2x2", out=io.StringIO())


# --- RL minibatch shapes ------------------------------------------------------------------------

@pytest.mark.parametrize("module, preset", [(ppo, "tiny"), (grpo, "tiny"), (online_dpo, "tiny"),
                                            (grpo, "tiny,rloo")])
def test_rl_abstract_batch_is_what_make_batch_gives(module, preset):
  """The shapes compile_check updates on are those of the algorithm's real arrays, sliced to
  one minibatch (a fake rollout of the config's sizes)."""
  config = module.get_config(preset)
  rl = config.rl
  rows, t = rl.prompts_per_iteration * rl.samples_per_prompt, rl.max_new_tokens
  length = rl.max_prompt_len + t
  rng = np.random.default_rng(0)
  per_token = lambda: rng.normal(size=(rows, t)).astype(np.float32)
  rollout = Rollout(
      prompts=[Prompt(context=())] * rows,
      rows={"tokens": np.ones((rows, length), np.int32),
            "positions": np.ones((rows, length), np.int32),
            "segment_ids": np.ones((rows, length), np.int32),
            "last": np.full(rows, length - 1, np.int32)},
      mask=np.ones((rows, t), np.float32), replies=None, stopped=np.ones(rows, bool),
      scores=rng.normal(size=rows).astype(np.float32), log_probs=per_token(),
      ref_log_probs=per_token(),
      values=per_token() if config.value.source != "none" else None)
  arrays, _ = get_algorithm(config.objective.name).make_batch(rollout, config, 0.1)
  units = next(iter(arrays.values())).shape[0]
  expected = {k: ((units // rl.minibatches,) + v.shape[1:], np.dtype(v.dtype))
              for k, v in arrays.items()}
  got = {k: (a.shape, np.dtype(a.dtype))
         for k, a in get_stage(config.objective.name).abstract_batch(config).items()}
  assert got == expected

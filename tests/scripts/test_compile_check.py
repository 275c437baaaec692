"""compile_check: TPU topology names, and the real train step compiled for a small TPU slice
without a TPU (libtpu's topology description), with its memory against the chip's HBM."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import pretrain
from models.build import count_params
from models.lora import trained_count
from parallel.tpu_topology import parse_topology
from scripts.compile_check import _parse_out_of_memory, device_memory, lower_train_step

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
  assert lines[1].startswith("mesh        {'data': 2, 'fsdp': 1, 'tensor': 2}, rules 'fsdp_tp'; "
                             "batch 16 x 64")
  assert lines[5].startswith("total       ") and lines[5].endswith("DOES NOT FIT")
  summary = json.loads(lines[-1])
  assert summary["fits"] is False and summary["devices"] == 4
  # Embedding 256 x 64 (tied), final norm, and 2 layers of q, o 64x64, k, v 64x32 (2 of 4
  # heads), gate, up, down 64x128 and 2 norms; arguments hold this device's share of the state.
  layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
  assert summary["params"] == 256 * 64 + 64 + 2 * layer
  assert 0 < summary["argument_bytes"] < 3 * 4 * summary["params"]
  assert summary["total_bytes"] > 1 << 20
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
  from scripts.compile_check import check  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("tiny")
  config.model.update(dict(d_model=64, num_layers=2, mlp_dim=128, vocab_size=256))
  config.data.seq_len = 64
  config.mesh.update(dict(data=-1, dcn_data=2))
  with open(os.devnull, "w") as out:
    summary = check(config, topology="v5e:2x2", num_slices=2, out=out)
  assert summary["devices"] == 8 and summary["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert summary["fits"] is True and summary["budget"] == 16 * 2**30

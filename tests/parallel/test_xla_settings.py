"""Per-platform XLA settings (parallel/xla_settings.py): which platform, which flags, and that
every flag is one the installed XLA knows (it aborts on an unknown one)."""

import os
import subprocess
import sys

import pytest

from parallel import xla_settings


@pytest.mark.parametrize("value, platform", [
    ("cuda", "gpu"), ("rocm", "gpu"), ("gpu,cpu", "gpu"), ("tpu", "tpu"), ("cpu", "cpu")])
def test_target_platform_follows_jax_platforms(value, platform):
  assert xla_settings.target_platform({"JAX_PLATFORMS": value}) == platform


def test_target_platform_of_this_machine_is_cpu():
  # No TPU chip and no GPU device file here (the test suite never needs one).
  assert xla_settings.target_platform({}) == "cpu"


def test_flags_per_platform():
  assert xla_settings.flags_for("gpu") == xla_settings.GPU_FLAGS
  assert xla_settings.flags_for("gpu", benchmark=True) == xla_settings.GPU_FLAGS
  assert xla_settings.flags_for("cpu") == ()  # training and tests keep XLA:CPU's defaults
  assert xla_settings.flags_for("cpu", benchmark=True) == xla_settings.CPU_BENCHMARK_FLAGS
  assert xla_settings.flags_for("tpu") == ()
  with pytest.raises(ValueError, match="platform 'npu'"):
    xla_settings.flags_for("npu")


def test_apply_adds_only_missing_flags_and_keeps_the_users():
  env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d"}
  assert xla_settings.apply_xla_settings("gpu", environ=env) == "gpu"
  flags = env["XLA_FLAGS"].split()
  assert flags[:2] == ["--xla_gpu_enable_latency_hiding_scheduler=false", "--xla_dump_to=/tmp/d"]
  names = [f.split("=")[0] for f in flags]
  assert len(names) == len(set(names))  # the user's value of a flag is never doubled
  assert set(flags[2:]) == set(xla_settings.GPU_FLAGS) - {
      "--xla_gpu_enable_latency_hiding_scheduler=true"}
  env = {}
  xla_settings.apply_xla_settings("cpu", environ=env)
  assert env == {}  # nothing to set: the variable stays unset
  xla_settings.apply_xla_settings("cpu", benchmark=True, environ=env)
  assert env["XLA_FLAGS"] == " ".join(xla_settings.CPU_BENCHMARK_FLAGS)


def test_every_flag_is_known_to_the_installed_xla():
  # XLA parses every platform's flags whichever backend starts, and aborts on an unknown one;
  # a planted unknown flag shows the check can fail.
  code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
  known = " ".join(xla_settings.GPU_FLAGS + xla_settings.CPU_BENCHMARK_FLAGS)
  for flags, ok in ((known, True), (known + " --xla_gpu_no_such_flag=true", False)):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert (proc.returncode == 0 and proc.stdout.strip() == "3.0") is ok, proc.stderr[-500:]

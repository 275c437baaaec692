"""With libtpu installed, a CPU machine's runs stay on the CPU without probing a TPU."""

import importlib.util
import os
import subprocess
import sys

import pytest

from parallel.platforms import avoid_tpu_probe, gpu_attached, tpu_chips_attached

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_explicit_platforms_are_left_alone():
  # tests/conftest.py sets JAX_PLATFORMS=cpu: an explicit choice is never overridden.
  assert not avoid_tpu_probe()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.skipif(tpu_chips_attached() > 0 or gpu_attached(), reason="an accelerator is here")
def test_cpu_run_is_quiet_with_libtpu_installed():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_"))}
  code = ("import parallel, jax; from jax._src import xla_bridge; "
          "print(jax.devices()[0].platform, sorted(xla_bridge.backends()))")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "cpu ['cpu']"
  assert result.stderr == ""  # no libtpu start-up errors, no "TPU backend" warnings

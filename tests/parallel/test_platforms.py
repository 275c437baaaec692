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


def test_a_gpu_plugin_alone_does_not_count_as_another_platform(tmp_path, monkeypatch):
  """JAX's CUDA plugin on a machine without a GPU (parallel/gpu_target.py compiles with it)
  cannot start, so it does not stop `avoid_tpu_probe`; any other PJRT plugin does."""
  import importlib
  import importlib.metadata
  from parallel import platforms
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
  for name in ("xla_cuda12", "xla_rocm"):
    (tmp_path / "jax_plugins" / name).mkdir(parents=True)
    (tmp_path / "jax_plugins" / name / "__init__.py").write_text("")
  monkeypatch.setattr(sys, "path", [str(tmp_path)])  # only these plugins are found
  importlib.invalidate_caches()
  monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)
  assert not platforms._pjrt_plugins_installed()
  (tmp_path / "jax_plugins" / "xla_other").mkdir()
  (tmp_path / "jax_plugins" / "xla_other" / "__init__.py").write_text("")
  importlib.invalidate_caches()
  assert platforms._pjrt_plugins_installed()

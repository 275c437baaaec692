"""Test-wide setup: 8 fake CPU devices for mesh tests, no accelerator probing, and one
compilation cache for the whole session.

The cache: many tests compile the very same programs (the tiny model's steps, samplers and
evaluations, built afresh by each test's trainer or run, and by the subprocesses of the
multi-process and CLI tests). JAX's persistent compilation cache, keyed by the program, its
compile options and the devices, lets every such program compile once per session: a fresh
directory made by the first process (pytest, or xdist's controller, whose workers and
subprocesses inherit the environment) and removed when it exits, its reads and writes under a
file lock. Setting JAX_COMPILATION_CACHE_DIR yourself keeps your directory (and its entries)
instead.
"""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jax-test-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Cache every program, however small or quick to compile.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size bound turns on the cache's file lock (the `filelock` package), held by every read
# and write: without it an entry is written in place, and another worker or subprocess can
# read it half-written and load a truncated executable (seen: a worker aborting mid-run).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))


def pytest_configure(config):
  # A program compiled for a TPU topology from this host (compile_check, the TPU program
  # tests) enters the cache too, but reading it back needs a TPU client: JAX then says so
  # and compiles it again, which is all these tests need.
  config.addinivalue_line(
      "filterwarnings",
      "ignore:Error reading persistent compilation cache entry:UserWarning")

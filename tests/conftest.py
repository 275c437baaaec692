"""Test-wide setup: 8 fake CPU devices for mesh tests, no accelerator probing, and one
compilation cache for the whole session.

The cache: many tests compile the very same programs (the tiny model's steps, samplers and
evaluations, built afresh by each test's trainer or run, and by the subprocesses of the CLI
tests). JAX's persistent compilation cache, keyed by the program, its compile options and the
devices, lets such a program compile once: a fresh directory made by the first process
(pytest, or xdist's controller) and removed when it exits, with one subdirectory per xdist
worker, which that worker's subprocesses inherit. JAX writes an entry in place (no temporary
file and rename) unless the cache has a size bound, and a size bound makes every write list
the whole directory under a file lock (O(entries) per write: the suite took 60% longer). So
no two processes that run at once share a directory: the workers have their own, a worker
waits for its CLI subprocesses, and the concurrent processes of a multi-process test get one
each (`tests.training.test_multiprocess.peer_cache_env`). Setting JAX_COMPILATION_CACHE_DIR
yourself keeps your directory (and its entries) instead.
"""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The session's cache root: made by the first process, inherited by xdist's workers.
CACHE_ROOT = "TESTS_JAX_CACHE_ROOT"
if CACHE_ROOT not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ[CACHE_ROOT] = tempfile.mkdtemp(prefix="jax-test-cache-")
  atexit.register(shutil.rmtree, os.environ[CACHE_ROOT], ignore_errors=True)
if CACHE_ROOT in os.environ:  # this process's own directory (xdist sets the worker's name)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      os.environ[CACHE_ROOT], os.environ.get("PYTEST_XDIST_WORKER", "main"))
# Cache every program, however small or quick to compile.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
  # A program compiled for a TPU topology from this host (compile_check, the TPU program
  # tests) enters the cache too, but reading it back needs a TPU client: JAX then says so
  # and compiles it again, which is all these tests need.
  config.addinivalue_line(
      "filterwarnings",
      "ignore:Error reading persistent compilation cache entry:UserWarning")

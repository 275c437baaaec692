"""The host memory allocator a CPU process runs under (Linux).

XLA:CPU allocates a step's temporaries (gigabytes at the `bench` shape) afresh on every call.
glibc's malloc serves blocks that big with mmap and unmaps them on free, so every step faults in
and zeroes all of it again, a large share of the step spent in the kernel (README.md,
Benchmarks, has the figures). An allocator that keeps freed memory for reuse removes that.
tcmalloc does (preloaded when installed, e.g. Debian's libtcmalloc-minimal4); without it, glibc
is told to (one arena, no mmap, no trimming). The choice needs the environment at process
start, so the entry point re-executes itself once with it (`reexec_with_allocator`);
`ALLOCATOR_ENV` marks the re-executed process and names the allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

CHOICES = ("auto", "tcmalloc", "glibc", "system")
ALLOCATOR_ENV = "HOST_ALLOCATOR"
_TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=1099511627776")


def find_tcmalloc() -> str | None:
  """The tcmalloc shared library's name for LD_PRELOAD, or None when not installed."""
  for name in _TCMALLOC_NAMES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def allocator_env(choice: str, environ: dict[str, str],
                  tcmalloc: str | None) -> tuple[str, dict[str, str]]:
  """(allocator name, environment variables to set) for the allocator `choice` (CHOICES).

  `auto` is tcmalloc when `tcmalloc` (its library) is given, else tuned glibc; `system` changes
  nothing. An LD_PRELOAD or GLIBC_TUNABLES already in `environ` is kept (the caller chose).
  """
  if choice not in CHOICES:
    raise ValueError(f"allocator: unknown {choice!r} ({' | '.join(CHOICES)})")
  if choice == "system" or environ.get("LD_PRELOAD") or environ.get("GLIBC_TUNABLES"):
    return "system", {}
  if choice == "tcmalloc" and tcmalloc is None:
    raise ValueError("allocator tcmalloc: no tcmalloc library found (install e.g. "
                     "libtcmalloc-minimal4, or choose auto)")
  if choice in ("auto", "tcmalloc") and tcmalloc is not None:
    return "tcmalloc", {"LD_PRELOAD": tcmalloc}
  return "glibc_tuned", {"GLIBC_TUNABLES": GLIBC_TUNABLES}


def reexec_with_allocator(choice: str, module: str) -> str:
  """Runs `python -m module <this process's arguments>` in place of this process under the
  allocator `choice` (once, Linux only), or returns the allocator this process runs under."""
  if ALLOCATOR_ENV in os.environ:
    return os.environ[ALLOCATOR_ENV]
  if not sys.platform.startswith("linux"):
    return "system"
  name, env = allocator_env(choice, dict(os.environ), find_tcmalloc())
  if not env:
    return name
  os.environ.update(env)
  os.environ[ALLOCATOR_ENV] = name
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])  # Does not return.

"""scripts/benchmarks/host_allocator.py: which allocator each choice gives, and the environment
it sets.

The command line that re-executes itself under it is tested in tests/scripts/test_benchmark.py.
"""

import pytest

from scripts.benchmarks import host_allocator


@pytest.mark.parametrize("choice, environ, tcmalloc, expected", [
    ("auto", {}, "libtcmalloc_minimal.so.4",
     ("tcmalloc", {"LD_PRELOAD": "libtcmalloc_minimal.so.4"})),
    ("auto", {}, None, ("glibc_tuned", {"GLIBC_TUNABLES": host_allocator.GLIBC_TUNABLES})),
    ("glibc", {}, "libtcmalloc.so.4",
     ("glibc_tuned", {"GLIBC_TUNABLES": host_allocator.GLIBC_TUNABLES})),
    ("system", {}, "libtcmalloc.so.4", ("system", {})),
    # An allocator the caller set is kept.
    ("auto", {"LD_PRELOAD": "libjemalloc.so.2"}, "libtcmalloc.so.4", ("system", {})),
])
def test_allocator_env(choice, environ, tcmalloc, expected):
  assert host_allocator.allocator_env(choice, environ, tcmalloc) == expected


def test_allocator_tcmalloc_missing_is_a_usage_error():
  with pytest.raises(Exception, match="no tcmalloc library found"):
    host_allocator.allocator_env("tcmalloc", {}, None)

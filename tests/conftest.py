"""Shared test setup.

Fake CPU devices: multi-device tests need 8 devices; XLA reads the flag once, before jax initialises, so it is
set here (the Makefile sets it too) unless the caller already chose a device count.
"""

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite mostly waits on XLA:CPU compiles of tiny programs that then run for milliseconds: LLVM at -O0 compiles
# them ~25% faster (tests/test_mtp.py 73 -> 53 s cold). It changes only the machine code LLVM emits — the HLO, its
# fusions and layouts, which the tests inspect, are XLA's and stay the same — and every number the tests compare
# is computed under the same flags. Worker processes the tests start get the same flag (TANDEM_TEST_XLA_FLAGS).
# Benchmarks and `make run` keep XLA's default.
os.environ.setdefault("TANDEM_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
if os.environ["TANDEM_TEST_XLA_FLAGS"] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + os.environ["TANDEM_TEST_XLA_FLAGS"]

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import the helpers beside them (hf_reference.py)

# Engines built by different tests often compile identical programs (same model shapes, same buckets): a
# per-session persistent compilation cache turns the repeats into cache hits.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tandem-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

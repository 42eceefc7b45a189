"""Shared test setup.

Fake CPU devices: multi-device tests need 8 devices; XLA reads the flag once, before jax initialises, so it is
set here (the Makefile sets it too) unless the caller already chose a device count.
"""

import os
import sys

import pytest

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite mostly waits on XLA:CPU compiles of tiny programs that then run for milliseconds: LLVM at -O0 compiles
# them ~25% faster (tests/test_mtp.py 73 -> 53 s cold). It changes only the machine code LLVM emits — the HLO, its
# fusions and layouts, which the tests inspect, are XLA's and stay the same — and every number the tests compare
# is computed under the same flags. Worker processes the tests start get the same flags (TANDEM_TEST_XLA_FLAGS).
# Benchmarks and `make run` keep XLA's default.
#
# TANDEM_TEST_FAST_CODEGEN=1 (`make test`'s first pass) also turns off XLA:CPU's MLIR fusion emitters, which halves
# the compile again (the dp=2,ep=4 engine's 6 executables: 11.8 -> 5.8 s; tests/test_dp_attention.py's two equality
# tests 76 -> 44 s cold) but cannot emit FP4 conversions (invalid LLVM IR) and changes some compiled HLO (a bf16
# pool's converts). Modules marked `xla_defaults` — FP4/FP8 kernels and formats, and the checks of XLA:CPU's
# compiled HLO — run in the second pass without it; collecting one under fast codegen is an error.
FAST_CODEGEN = os.environ.get("TANDEM_TEST_FAST_CODEGEN") == "1"
os.environ.setdefault("TANDEM_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0"
                      + (" --xla_cpu_use_fusion_emitters=false" if FAST_CODEGEN else ""))
if os.environ["TANDEM_TEST_XLA_FLAGS"] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + os.environ["TANDEM_TEST_XLA_FLAGS"]

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import the helpers beside them (hf_reference.py)

# Engines built by different tests often compile identical programs (same model shapes, same buckets): a
# per-session persistent compilation cache turns the repeats into cache hits.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tandem-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "xla_defaults: needs XLA:CPU's default codegen (not TANDEM_TEST_FAST_CODEGEN)")


@pytest.hookimpl(trylast=True)   # after -m deselected what it deselects
def pytest_collection_modifyitems(config, items):
    if FAST_CODEGEN and "--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"]:
        bad = sorted({i.nodeid.split("::")[0] for i in items if i.get_closest_marker("xla_defaults")})
        if bad:
            raise pytest.UsageError(f"{bad} need XLA:CPU's default codegen: deselect them (-m 'not xla_defaults') "
                                    "or unset TANDEM_TEST_FAST_CODEGEN")

"""Shared test setup.

Fake CPU devices: multi-device tests need 8 devices; XLA reads the flag once, before jax initialises, so it is
set here (the Makefile sets it too) unless the caller already chose a device count.
"""

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import the helpers beside them (hf_reference.py)

# Engines built by different tests often compile identical programs (same model shapes, same buckets): a
# per-session persistent compilation cache turns the repeats into cache hits.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tandem-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

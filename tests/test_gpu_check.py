"""`python -m bench.gpu_check --cpu_smoke`: the GPU check's own code path at tiny sizes on CPU (kernels in the
Pallas interpreter, a V3-shaped slice through `LLM` with random weights made on the device), so the one command a
lent GPU runs is known to run; every part ends ok or skipped/failed with a reason, and the JSON survives a failure.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, timeout=600):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 " + os.environ["TANDEM_TEST_XLA_FLAGS"])
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_cpu_smoke_fills_every_part(tmp_path):
    data, stdout = _run(tmp_path, "--cpu_smoke", "--decode_tokens=8")
    parts = data["parts"]
    assert list(parts) == ["device", "kernels", "paged", "engine", "memory"]
    for name in ("device", "kernels", "paged", "engine"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts["memory"]["status"] == "skipped" and "memory_stats" in parts["memory"]["reason"]
    cases = parts["kernels"]["cases"]
    assert {c.split("_")[0] for c in cases} == {"fp8", "nvfp4", "mxfp4"} and len(cases) == 6
    for name, c in cases.items():
        assert c["rel_err_vs_xla"] < 2e-2 and c["kernel_us"] > 0 and c["bf16_dot_us"] > 0, (name, c)
    assert parts["paged"]["heads_4"]["rel_err_vs_gather"] < 2e-2
    eng = parts["engine"]
    assert eng["plain"]["matmul_impl"] == eng["plain"]["attention_impl"] == "pallas_interpret"
    for tag in ("plain", "mtp"):
        for b in (1, 4):
            assert eng[tag][f"decode_b{b}"]["tok_s"] > 0, (tag, eng[tag])
    assert eng["plain"]["prefill_40_ms"] > 0
    assert "== engine" in stdout and "decode_b4" in stdout   # printed as it goes


def test_a_failed_part_is_recorded_and_the_rest_still_run(tmp_path):
    """Without --cpu_smoke on a CPU: the device part fails (no GPU) with its reason, memory is skipped with its
    reason, and the JSON is written."""
    data, _ = _run(tmp_path, "--parts=device,memory", timeout=120)
    dev, mem = data["parts"]["device"], data["parts"]["memory"]
    assert dev["status"] == "failed" and "expected a GPU" in dev["reason"] and dev["platform"] == "cpu"
    assert mem["status"] == "skipped" and "engine" in mem["reason"]
    assert data["total_s"] > 0

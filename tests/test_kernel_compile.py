"""Every Triton kernel (FP4 dense/batched/grouped x NVFP4/MXFP4, block-FP8 dense/batched/grouped, paged MLA decode)
compiled to GPU machine code for sm_90 (H100/H200) and sm_80 without a GPU: the exact Triton modules of their cuda
lowering, through Triton's own compiler (TTIR -> PTX -> cubin via ptxas), in a subprocess (pallas_kernels.triton_check).
A compile failure fails the suite. On Hopper every dot must run on bf16 tensor cores (no tf32, no f32 FMA loop), and
the 64-row+ tiles at DeepSeek-V3's dims must use wgmma.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from pallas_kernels import triton_check

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("ttir")
    written = triton_check.dump(str(d))
    py = os.environ.get("TANDEM_TRITON_PYTHON", sys.executable)   # the test extra carries triton
    env = dict(os.environ, TRITON_CACHE_DIR=str(d / "cache"))
    r = subprocess.run([py, "-m", "pallas_kernels.triton_check", "compile", str(d), "--cc", "90", "80"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"(\S+)\s+sm_(\d+): (OK|FAIL) ?(.*)", line)
        if m:
            rows[(m[1], int(m[2]))] = json.loads(m[4]) if m[3] == "OK" else m[4]
    return written, r, rows


def test_every_kernel_compiles_for_sm90_and_sm80(compiled):
    written, r, rows = compiled
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    cases = {os.path.basename(p)[:-5] for p in written}
    assert {c.split("_")[0] for c in cases} == {"fp4", "fp8", "paged"}
    assert len(cases) == len(triton_check.kernel_cases()) == 14
    for c in cases:
        for cc in (90, 80):
            assert isinstance(rows.get((c, cc)), dict), (c, cc, rows.get((c, cc)))
            assert rows[(c, cc)]["cubin_bytes"] > 0
            # within the card's shared memory per block (sm_90: 227 KiB, sm_80: 163 KiB), or launch would fail
            assert rows[(c, cc)]["shared_bytes"] <= {90: 232448, 80: 166912}[cc], (c, cc, rows[(c, cc)])


def test_hopper_dots_are_bf16_tensor_core(compiled):
    _, _, rows = compiled
    for (case, cc), row in rows.items():
        if cc != 90:
            continue
        assert row["dots"], case
        for d in row["dots"]:
            assert "bf16.bf16" in d and "tf32" not in d, (case, d)
    for case in ("fp8_dense_v3_prefill", "fp8_grouped_v3_prefill", "fp8_batched_v3", "fp4_batched_nvfp4"):
        assert rows[(case, 90)]["wgmma"] > 0, case

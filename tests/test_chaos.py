"""The chaos soak (`bench.chaos`), one minute of it: router + 2 prefill + 2 decode worker processes + the OpenAI
server under 4 clients, with kill -9, SIGSTOP, a graceful restart, delayed and cut control connections and corrupted
KV pages. Every request ends within the bound, every completed greedy output equals the fault-free reference, no
page or lease is left held. (The >= 30-minute run's figures: docs/BENCHMARKS.md.)"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(600)
def test_one_minute_of_chaos_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    exe = os.environ.get("TANDEM_TEST_EXE_CACHE", os.path.expanduser("~/.cache/tandem/exe_test_cache"))
    r = subprocess.run([sys.executable, "-m", "bench.chaos", "--minutes=1", "--fault_every_s=6", f"--out={out}",
                        f"--executable_cache_dir={exe}"], cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert r.returncode == 0 and out.exists(), (r.stdout[-3000:], r.stderr[-3000:])
    s = json.loads(out.read_text())
    assert s["ok"] and s["mismatches"] == 0 and s["over_bound"] == 0 and not s["leaks"], s
    assert all(s["faults"].get(k, 0) >= 1 for k in ("kill", "stop", "restart", "delay", "drop")), s["faults"]
    assert s["faults"]["corrupt_pages_caught (surviving incarnations)"] >= 1, s["faults"]
    assert s["completed"] >= 100 and s["max_time_to_terminal_s"] < 60, s
    # a request may legitimately run out of retries (1 of 65,073 in the 30-minute run); a regression is many more
    # (a cut connection burning retries: 75 of 2,174 in one minute before the unreachable-send fix)
    assert s["terminal_states"].get("error", 0) <= 0.01 * s["requests"], s

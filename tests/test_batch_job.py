"""`python -m serving.batch`: one output line per input line, error lines for bad input, and resume after a kill.

The kill is real: the job runs in a subprocess, the test reads its printed completions from the pipe and sends
SIGKILL after a few, then reruns it and checks every id appears exactly once.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

import hf_reference
from serving.batch import parse_line, read_done_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("batch_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
    return path


def _job(ckpt, inp, out, cache, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 " + os.environ["TANDEM_TEST_XLA_FLAGS"])
    cmd = [sys.executable, "-m", "serving.batch", "--input", str(inp), "--output", str(out), "--checkpoint", ckpt,
           "--mode", "colocated", "--max_tokens", "24", "--page_size", "8", "--num_pages", "64",
           "--max_model_len", "64", "--prefill_buckets", "16", "--max_batch", "2", "--decode_steps", "2", "--noprogress", "--print_outputs",
           *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_batch_job_resumes_after_kill_without_loss_or_duplicates(ckpt, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt_token_ids": [(7 * i + j) % 90 + 2 for j in range(3 + i % 5)]})
             for i in range(20)]
    lines.insert(5, "{not json")                                                # -> error line "line-6"
    lines.insert(9, json.dumps({"id": "bad-temp", "prompt_token_ids": [3], "temperature": -2}))
    inp.write_text("\n".join(lines) + "\n")
    ids = {f"r{i}" for i in range(20)} | {"line-6", "bad-temp"}

    proc = _job(ckpt, inp, out, tmp_path / "jaxcache")
    seen = 0
    for line in proc.stdout:  # completions are printed as they finish; kill after the 3rd
        if line.startswith("[r"):
            seen += 1
            if seen == 3:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with open(out, "a") as f:
        f.write('{"id": "torn')  # as if the kill landed mid-write
    first = read_done_ids(str(out))
    assert 3 <= len(first) < len(ids), "the kill must land mid-run"

    proc = _job(ckpt, inp, out, tmp_path / "jaxcache")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "resuming" in log and "TTFT" in log and "p99" in log
    assert "weights float32" in log   # no --dtype: the CPU platform's default, said at start
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(ids)  # each id exactly once
    by_id = {r["id"]: r for r in rows}
    assert "malformed JSON" in by_id["line-6"]["error"]
    assert "SamplingParams.temperature" in by_id["bad-temp"]["error"]
    for i in range(20):
        r = by_id[f"r{i}"]
        assert r["finish_reason"] in ("length", "stop") and 1 <= len(r["token_ids"]) <= 24
        assert r["metrics"]["ttft_s"] > 0

    # The killed-and-resumed output equals an uninterrupted run of the same job (greedy), line for line.
    full = tmp_path / "uninterrupted.jsonl"
    proc = _job(ckpt, inp, full, tmp_path / "jaxcache", "--expert_counts_out", str(tmp_path / "counts.json"))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    # the routing counts the executables kept on device, for `planner predict --expert_load` / EPLB
    counts = json.loads((tmp_path / "counts.json").read_text())["counts"]
    cfg = json.loads(open(os.path.join(ckpt, "config.json")).read())
    assert len(counts[0]) == cfg["n_routed_experts"] and sum(counts[0]) > 0
    assert sum(counts[0]) % cfg["num_experts_per_tok"] == 0
    ref = {r["id"]: r for r in map(json.loads, full.read_text().splitlines())}
    assert ref.keys() == by_id.keys()
    for rid, r in ref.items():
        assert (by_id[rid].get("token_ids"), by_id[rid].get("finish_reason"), by_id[rid].get("text")) == \
            (r.get("token_ids"), r.get("finish_reason"), r.get("text")), rid


def test_parse_line_validates_fields():
    d = {"max_tokens": 8, "temperature": 0.0}
    assert parse_line(1, '{"id": 5, "prompt": "hi", "top_k": 3}', d).params.top_k == 3
    assert "exactly one of" in parse_line(2, '{"id": "x"}', d).error
    assert "exactly one of" in parse_line(3, '{"prompt": "a", "prompt_token_ids": [1]}', d).error
    assert "expected a JSON object" in parse_line(4, "[1, 2]", d).error
    assert "unknown sampling field" in parse_line(5, '{"prompt": "a", "temprature": 1}', d).error
    assert "SamplingParams.max_tokens" in parse_line(6, '{"prompt": "a", "max_tokens": 0}', d).error


def test_prefill_rows_and_tokens_flags_reach_the_engine_config():
    """--prefill_rows / --prefill_tokens (every entry point and worker) set the batched-prefill shapes."""
    from absl import flags as absl_flags

    from model.config import preset
    from serving import flags as serving_flags

    serving_flags.define_engine_flags()
    F = absl_flags.FLAGS
    try:
        F(["prog", "--prefill_rows=1,2,8", "--prefill_tokens=512", "--prefill_buckets=16,64"])
        ec = serving_flags.engine_config(preset("tiny"), F)
        assert ec.prefill_rows == (1, 2, 8) and ec.prefill_tokens == 512
        assert ec.rows_for(64) == (1, 2, 8) and ec.rows_for(16) == (1, 2, 8)
        F.unparse_flags()
        F(["prog"])   # defaults: (1, 4) within 256 tokens
        ec = serving_flags.engine_config(preset("tiny"), F)
        assert ec.prefill_rows == (1, 4) and ec.prefill_tokens is None and ec.rows_for(64) == (1, 4)
    finally:
        F.unparse_flags()

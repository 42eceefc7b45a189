"""Tandem behind NVIDIA Dynamo's frontend vs Tandem's own OpenAI server: same checkpoint, same engine flags, same
client (aiperf, Dynamo's benchmark client) and prompts; plus how long a Dynamo worker takes to be ready.

    python -m bench.dynamo --aiperf .peers/aiperf/bin/aiperf [--concurrency 1,8] [--runs 3]

Per run: Tandem's server (`serving.server`) under aiperf at each concurrency; then the broker, Dynamo's frontend
(`--router-mode kv`) and one aggregated `serving.dynamo` worker, started twice — first on an empty compilation
cache (cold readiness), then again on the cache it filled (warm readiness) — and aiperf through the frontend.
Readiness = process start -> the model listed in the frontend's /v1/models. Worst of the runs per figure; JSON in
--out, a table on stdout. Every process binds 127.0.0.1; one CPU device each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from absl import app, flags

from bench.vs_vllm import _free_port, parse_aiperf, stop_server, worst
from serving.config import DEFAULT_CHECKPOINT
from serving.dynamo_setup import local_env, model_card

FLAGS = flags.FLAGS
flags.DEFINE_string("aiperf", None, "aiperf executable (make peers: .peers/aiperf/bin/aiperf)")
flags.DEFINE_string("checkpoint", DEFAULT_CHECKPOINT, "HF checkpoint (default: the shipped model)")
flags.DEFINE_list("concurrency", ["1", "8"], "aiperf concurrency levels")
flags.DEFINE_integer("isl", 64, "input tokens per request")
flags.DEFINE_integer("osl", 64, "output tokens per request (ignore_eos)")
flags.DEFINE_integer("requests_per_client", 4, "requests per concurrent client")
flags.DEFINE_integer("runs", 1, "runs; the table shows the worst of them")
flags.DEFINE_list("engine_args", [], "extra engine flags for both sides, e.g. --engine_args=--prefix_caching")
flags.DEFINE_string("out", "runs/dynamo_bench.json", "results JSON")
flags.DEFINE_integer("timeout_s", 1800, "bound on each process wait and aiperf run")


def _env(extra: dict | None = None, cache: str | None = None) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               **(extra or {}))
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(cmd, env, log) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_url(p: subprocess.Popen, url: str, ok, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {p.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and ok(r.read()):
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready within {timeout:.0f} s")


def _aiperf(url: str, name: str, tokenizer: str, conc: int, artifacts: str) -> dict:
    shutil.rmtree(artifacts, ignore_errors=True)
    cmd = [FLAGS.aiperf, "profile", "--model", name, "--url", url, "--endpoint-type", "completions", "--streaming",
           "--tokenizer", tokenizer, "--isl", str(FLAGS.isl), "--isl-stddev", "0", "--osl", str(FLAGS.osl),
           "--osl-stddev", "0", "--extra-inputs", "ignore_eos:true", "--concurrency", str(conc),
           "--request-count", str(FLAGS.requests_per_client * conc), "--warmup-request-count", str(conc),
           "--random-seed", "1", "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry",
           "--artifact-dir", artifacts]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout_s)
    path = os.path.join(artifacts, "profile_export_aiperf.json")
    if p.returncode or not os.path.exists(path):
        raise RuntimeError(f"aiperf failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    with open(path) as f:
        return parse_aiperf(json.load(f))


def _load(url, name, tokenizer, side, run, work) -> dict:
    out = {}
    for c in FLAGS.concurrency:
        out[f"c{c}"] = _aiperf(url, name, tokenizer, int(c), os.path.join(work, f"aiperf-{side}-c{c}-r{run}"))
        print(f"  {side} c={c}: {out[f'c{c}']}", flush=True)
    return out


def run_server(run: int, name: str, tokenizer: str, work: str, cache: str) -> dict:
    port = _free_port()
    p = _start([sys.executable, "-m", "serving.server", f"--checkpoint={FLAGS.checkpoint}", f"--port={port}",
                f"--served_model_name={name}", *FLAGS.engine_args], _env(cache=cache),
               os.path.join(work, f"server-r{run}.log"))
    try:
        out = {"ready_s": _wait_url(p, f"http://127.0.0.1:{port}/health", lambda b: True, FLAGS.timeout_s)}
        out.update(_load(f"http://127.0.0.1:{port}", name, tokenizer, "server", run, work))
    finally:
        stop_server(p)
    return out


def run_dynamo(run: int, name: str, tokenizer: str, work: str) -> dict:
    state = tempfile.mkdtemp(prefix="dyn-", dir=work)
    xsub, xpub, http = _free_port(), _free_port(), _free_port()
    env = _env(dict(local_env(state, xsub, xpub), HOME=os.path.join(state, "home")))
    procs = []
    out = {}
    cache = os.path.join(state, "xla")   # empty: the first start is cold
    try:
        procs.append(_start([sys.executable, "-m", "serving.dynamo", "--role=broker", f"--xsub_port={xsub}",
                             f"--xpub_port={xpub}"], env, os.path.join(work, f"broker-r{run}.log")))
        procs.append(_start([sys.executable, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port",
                             str(http), "--router-mode", "kv"], env, os.path.join(work, f"frontend-r{run}.log")))
        models = f"http://127.0.0.1:{http}/v1/models"
        for start in ("cold", "warm"):
            w = _start([sys.executable, "-m", "serving.dynamo", "--role=aggregated", f"--checkpoint={FLAGS.checkpoint}",
                        f"--served_model_name={name}", f"--compilation_cache_dir={cache}", *FLAGS.engine_args], env,
                       os.path.join(work, f"worker-{start}-r{run}.log"))
            procs.append(w)
            out[f"ready_{start}_s"] = _wait_url(w, models, lambda b: name.encode() in b, FLAGS.timeout_s)
            print(f"  dynamo worker ready ({start} compilation cache): {out[f'ready_{start}_s']:.1f} s", flush=True)
            if start == "cold":   # stop it (it unregisters), wait until the frontend drops the model, start again
                stop_server(w)
                t0 = time.monotonic()
                while True:
                    with urllib.request.urlopen(models, timeout=2) as r:
                        if name.encode() not in r.read():
                            break
                    if time.monotonic() - t0 > 60:
                        raise RuntimeError("the stopped worker's model is still listed after 60 s")
                    time.sleep(0.25)
        out.update(_load(f"http://127.0.0.1:{http}", name, tokenizer, "dynamo", run, work))
    finally:
        for p in reversed(procs):
            stop_server(p)
    return out


def table(res: dict) -> str:
    s, d = res["server"], res["dynamo"]
    lines = [f"Tandem behind Dynamo's frontend vs Tandem's own server, {res['checkpoint']}, {FLAGS.isl} in / "
             f"{FLAGS.osl} out, worst of {res['runs']} run(s)",
             f"readiness (worst): Tandem server {s['ready_s']:.1f} s (its first run starts on an empty compilation "
             f"cache); Dynamo worker cold {d['ready_cold_s']:.1f} s, warm {d['ready_warm_s']:.1f} s",
             "| concurrency | server out tok/s | Dynamo out tok/s | server TTFT p50 | Dynamo TTFT p50 | server TPOT p50 "
             "| Dynamo TPOT p50 |", "|---|---|---|---|---|---|---|"]
    for c in FLAGS.concurrency:
        a, b = s[f"c{c}"], d[f"c{c}"]
        lines.append(f"| {c} | {a['out_tok_s']:.0f} | {b['out_tok_s']:.0f} | {a['ttft_p50_ms']:.1f} ms | "
                     f"{b['ttft_p50_ms']:.1f} ms | {a['itl_p50_ms']:.2f} ms | {b['itl_p50_ms']:.2f} ms |")
    return "\n".join(lines)


def main(argv) -> int:
    del argv
    if not FLAGS.aiperf:
        raise app.UsageError("--aiperf is required (make peers: .peers/aiperf/bin/aiperf)")
    name = os.path.basename(os.path.abspath(FLAGS.checkpoint).rstrip("/"))
    work = os.path.abspath(os.path.join(os.path.dirname(FLAGS.out) or ".", "dynamo_bench"))
    os.makedirs(work, exist_ok=True)
    tokenizer = model_card(FLAGS.checkpoint, 4096, os.path.join(work, "cards"))   # aiperf loads it like an HF model
    cache = os.path.join(work, "server-xla")
    runs = {"server": [], "dynamo": []}
    for r in range(FLAGS.runs):
        runs["server"].append(run_server(r, name, tokenizer, work, cache))
        runs["dynamo"].append(run_dynamo(r, name, tokenizer, work))
    res = {"checkpoint": FLAGS.checkpoint, "runs": FLAGS.runs, "all": runs,
           "server": worst(runs["server"]), "dynamo": worst(runs["dynamo"])}
    with open(FLAGS.out, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    return 0


if __name__ == "__main__":
    app.run(main)

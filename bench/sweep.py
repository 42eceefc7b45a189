"""Serving benchmark sweep in the InferenceX protocol against OpenAI-compatible servers.

    python -m bench.sweep --targets colocated=http://127.0.0.1:8000@1,disagg=http://127.0.0.1:8001@2 \\
        [--isl 1024 --osl 1024 --concurrency 1,2,4,...,64] [--json out.json --png out.png]
    python -m bench.sweep --launch colocated,disagg,pd [--short]  # starts `serving.server`s itself

Protocol: fixed input/output lengths — each prompt has a uniform random length in [0.8 ISL, ISL] (random token
ids, sent as a token-id prompt), exactly OSL output tokens (`ignore_eos`); concurrency doubles from 1 to the
maximum; at each point `--prompts_per_concurrency` x concurrency requests (default 10x) run through that many
closed-loop clients after a warm-up of one request per client. Per point: TTFT, TPOT, ITL and end-to-end latency
(mean / p50 / p90 / p99), output tok/s, tok/s per device (`@devices` of the target), tok/s per user (1 / TPOT),
and goodput (requests/s meeting the TTFT and TPOT SLOs). Writes JSON and a Pareto plot of tok/s/device against
tok/s/user with one curve per target. Launched targets: `colocated` (1 device), `disagg` (in-process prefill and
decode engines, 2 devices), `pd` (a server over one prefill and one decode worker process, 1 device each). From the
server's /metrics, per point: mean KV transfer per request and mean TTFT (the transfer's share of the time until a
request's decode starts; with the router's early first token the client's TTFT does not wait for the transfer).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_list("targets", [], "name=url@devices, e.g. colocated=http://127.0.0.1:8000@1")
flags.DEFINE_list("launch", [], "start servers for these modes instead (colocated, disagg, pd) on the shipped "
                  "model")
flags.DEFINE_integer("isl", 256, "input length L (prompts uniform in [0.8L, L])")
flags.DEFINE_integer("osl", 128, "output tokens per request (ignore_eos)")
flags.DEFINE_float("long_share", 0.0, "mixed load: this share of the prompts (a seeded draw) has length in "
                   "[0.8 long_isl, long_isl] instead")
flags.DEFINE_integer("long_isl", 1024, "input length of the long prompts of a mixed load")
flags.DEFINE_list("concurrency", ["1", "2", "4", "8", "16"], "concurrency points (InferenceX doubles them)")
flags.DEFINE_integer("prompts_per_concurrency", 10, "requests per point = this x concurrency")
flags.DEFINE_float("slo_ttft_ms", 2000.0, "goodput SLO: time to first token")
flags.DEFINE_float("slo_tpot_ms", 100.0, "goodput SLO: time per output token")
flags.DEFINE_float("request_timeout_s", 300.0, "a request that takes longer fails the point")
flags.DEFINE_string("model", None, "model id to send (default: the server's first /v1/models entry)")
flags.DEFINE_string("api_key", None, "bearer key (default: $TANDEM_API_KEY)")
flags.DEFINE_string("json", "runs/sweep.json", "results")
flags.DEFINE_string("png", "runs/sweep.png", "Pareto plot")
flags.DEFINE_bool("short", False, "a quick version (make bench): ISL 64, OSL 32, concurrency 1,2,4, 4x prompts")
flags.DEFINE_integer("seed", 0, "prompt RNG seed")
FLAGS = flags.FLAGS


def _stats(xs) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs, np.float64) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


async def _one(client, url: str, model: str, prompt: list[int], osl: int, headers: dict) -> dict:
    """One streamed completion: token arrival times."""
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    times, n_tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for c in ev.get("choices", []):
                k = len(c.get("token_ids") or ())
                if k:
                    times.append((time.perf_counter(), k))
                    n_tokens += k
    end = time.perf_counter()
    if n_tokens != osl:
        raise RuntimeError(f"asked for {osl} tokens, got {n_tokens}")
    ttft = times[0][0] - t0
    itl = [(b[0] - a[0]) / b[1] for a, b in zip(times, times[1:])]   # per token within multi-token chunks
    return {"ttft": ttft, "e2e": end - t0, "tpot": (end - t0 - ttft) / max(1, osl - 1), "itl": itl,
            "tokens": n_tokens}


async def _point(url: str, model: str, conc: int, n_req: int, rng, headers: dict) -> dict:
    import httpx

    L, LL = FLAGS.isl, FLAGS.long_isl
    lens = rng.integers(int(0.8 * L), L + 1, n_req + conc)
    if FLAGS.long_share > 0:   # mixed load: long prompts among the short ones
        long = rng.random(n_req + conc) < FLAGS.long_share
        lens[long] = rng.integers(int(0.8 * LL), LL + 1, int(long.sum()))
    prompts = [rng.integers(2, 4000, int(n)).tolist() for n in lens]
    limits = httpx.Limits(max_connections=conc + 4)
    async with httpx.AsyncClient(timeout=FLAGS.request_timeout_s, limits=limits) as client:
        await asyncio.gather(*[_one(client, url, model, prompts[n_req + i], FLAGS.osl, headers)
                               for i in range(conc)])                      # warm-up: one per client
        todo = list(range(n_req))
        results = []

        async def worker():
            while todo:
                i = todo.pop()
                results.append(await _one(client, url, model, prompts[i], FLAGS.osl, headers))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        dur = time.perf_counter() - t0
    out_tok = sum(r["tokens"] for r in results)
    good = sum(r["ttft"] * 1e3 <= FLAGS.slo_ttft_ms and r["tpot"] * 1e3 <= FLAGS.slo_tpot_ms for r in results)
    return {"concurrency": conc, "requests": len(results), "duration_s": dur, "output_tok_s": out_tok / dur,
            "tok_s_user": float(np.mean([1.0 / r["tpot"] for r in results])),
            "ttft_ms": _stats([r["ttft"] for r in results]), "tpot_ms": _stats([r["tpot"] for r in results]),
            "itl_ms": _stats([x for r in results for x in r["itl"]]), "e2e_ms": _stats([r["e2e"] for r in results]),
            "goodput_req_s": good / dur, "slo_met": good / len(results)}


def _scrape(url: str, headers: dict) -> dict[str, float]:
    """Sums and counts of the server's TTFT and KV-transfer histograms (Prometheus text)."""
    import httpx

    want = ("tandem_time_to_first_token_seconds_sum", "tandem_time_to_first_token_seconds_count",
            "tandem_kv_transfer_seconds_sum", "tandem_kv_transfer_seconds_count")
    out = dict.fromkeys(want, 0.0)
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        name, _, v = line.partition(" ")
        if name in out:
            out[name] = float(v)
    return out


def _model_of(url: str, headers: dict) -> str:
    import httpx

    r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def sweep(targets: list[tuple[str, str, int]]) -> dict:
    key = FLAGS.api_key or os.environ.get("TANDEM_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    res = {"protocol": {"isl": FLAGS.isl, "osl": FLAGS.osl, "isl_range": [int(0.8 * FLAGS.isl), FLAGS.isl],
                        "long_share": FLAGS.long_share, "long_isl": FLAGS.long_isl,
                        "prompts_per_concurrency": FLAGS.prompts_per_concurrency, "ignore_eos": True,
                        "slo_ttft_ms": FLAGS.slo_ttft_ms, "slo_tpot_ms": FLAGS.slo_tpot_ms},
           "machine": f"{os.cpu_count()} CPU cores", "targets": {}}
    for name, url, devices in targets:
        model = FLAGS.model or _model_of(url, headers)
        rng = np.random.default_rng(FLAGS.seed)
        points = []
        for c in (int(x) for x in FLAGS.concurrency):
            before = _scrape(url, headers)
            p = asyncio.run(_point(url, model, c, FLAGS.prompts_per_concurrency * c, rng, headers))
            after = _scrape(url, headers)
            d = {k: after[k] - before[k] for k in after}
            n_x, n_t = d["tandem_kv_transfer_seconds_count"], d["tandem_time_to_first_token_seconds_count"]
            p["server_transfer_ms_mean"] = d["tandem_kv_transfer_seconds_sum"] / n_x * 1e3 if n_x else None
            p["server_ttft_ms_mean"] = d["tandem_time_to_first_token_seconds_sum"] / n_t * 1e3 if n_t else None
            p["tok_s_device"] = p["output_tok_s"] / devices
            points.append(p)
            print(f"{name:<10} c={c:3d} | {p['output_tok_s']:8.1f} tok/s ({p['tok_s_device']:8.1f}/device, "
                  f"{p['tok_s_user']:6.1f}/user) | TTFT p50 {p['ttft_ms']['p50']:7.1f} p99 {p['ttft_ms']['p99']:7.1f}"
                  f" ms | TPOT p50 {p['tpot_ms']['p50']:6.1f} ms | goodput {p['goodput_req_s']:5.2f} req/s "
                  f"({p['slo_met']:.0%} in SLO)" + (f" | transfer mean {p['server_transfer_ms_mean']:.1f} ms"
                                                   if p["server_transfer_ms_mean"] else ""), flush=True)
        res["targets"][name] = {"url": url, "devices": devices, "model": model, "points": points}
    return res


def pareto_png(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, t in res["targets"].items():
        xs = [p["tok_s_user"] for p in t["points"]]
        ys = [p["tok_s_device"] for p in t["points"]]
        ax.plot(xs, ys, "o-", label=f"{name} ({t['devices']} device{'s' if t['devices'] > 1 else ''})")
        for p, x, y in zip(t["points"], xs, ys):
            ax.annotate(f"c={p['concurrency']}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    pr = res["protocol"]
    ax.set_xlabel("tok/s/user (1 / TPOT)")
    ax.set_ylabel("tok/s/device")
    ax.set_title(f"ISL {pr['isl']} / OSL {pr['osl']}, {res['machine']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- --launch: start servers on free ports, wait until /ready (bounded), stop them after --------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str) -> tuple[subprocess.Popen, str, int, str, list[subprocess.Popen]]:
    """Start `python -m serving.server` for `mode` on a free port (and, for pd, its worker processes):
    (server process, url, devices, log path, worker processes)."""
    port = _free_port()
    engine = ["--max_batch=16", "--num_pages=512"]
    args = [sys.executable, "-m", "serving.server", f"--port={port}", "--max_queue=1024", *engine]
    devices, workers = 1, []
    env = dict(os.environ)
    if mode == "disagg":
        args += ["--mode=disagg", "--prefill_mesh=tp=1", "--decode_mesh=ep=1"]
        devices = 2
    elif mode == "pd":   # one prefill and one decode worker process, 1 device each, behind the server's router
        wenv = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip())
        addrs = []
        for role in ("prefill", "decode"):
            wport = _free_port()
            wlog = open(os.path.join("runs", f"sweep-worker-{role}.log"), "w")
            workers.append(subprocess.Popen([sys.executable, "-m", "serving.worker", f"--role={role}",
                                             f"--port={wport}", *engine], stdout=wlog, stderr=subprocess.STDOUT,
                                            env=wenv))
            addrs.append(f"127.0.0.1:{wport}")
        for w, a in zip(workers, addrs):   # compiled and answering before the server's router waits for them
            _wait_worker(w, a)
        args += [f"--workers={','.join(addrs)}"]
        devices = 2
    elif mode != "colocated":
        raise ValueError(f"--launch {mode!r}: expected colocated, disagg or pd")
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):   # CPU: fake devices for disagg
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    log = os.path.join("runs", f"sweep-server-{mode}.log")
    p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    return p, f"http://127.0.0.1:{port}", devices, log, workers


def _wait_worker(p: subprocess.Popen, addr: str, timeout: float = 900.0) -> None:
    """Until the worker answers a control-plane health request (each probe bounded)."""
    import zmq

    from serving.protocol import decode_message, encode_message

    token = os.environ.get("TANDEM_TOKEN")
    end = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"worker {addr} exited with {p.returncode}; see runs/sweep-worker-*.log")
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://{addr}")
        try:
            s.send(encode_message("health", token))
            if s.poll(2000) and decode_message(s.recv(), token)["type"] == "health_ok":
                return
        finally:
            s.close(0)
        if time.monotonic() > end:
            raise TimeoutError(f"worker {addr} not ready within {timeout:.0f} s")


def wait_ready(p: subprocess.Popen, url: str, log: str, timeout: float = 900.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"server {url} exited with {p.returncode}; see {log}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"server {url} not ready within {timeout:.0f} s; see {log}")
        try:
            p.wait(timeout=0.5)   # bounded wait between readiness probes
        except subprocess.TimeoutExpired:
            pass


def main(argv):
    del argv
    if FLAGS.short:
        FLAGS.isl, FLAGS.osl, FLAGS.prompts_per_concurrency = 64, 32, 4
        FLAGS.concurrency = ["1", "2", "4"]
    os.makedirs("runs", exist_ok=True)
    procs, targets = [], []
    try:
        launched = [(mode, *launch(mode)) for mode in FLAGS.launch]   # start all, then wait (they compile at once)
        for mode, p, url, dev, log, workers in launched:
            procs += [p, *workers]
        for mode, p, url, dev, log, _ in launched:
            wait_ready(p, url, log)
            targets.append((mode, url, dev))
        for t in FLAGS.targets:
            name, rest = t.split("=", 1)
            url, _, dev = rest.partition("@")
            targets.append((name, url.rstrip("/"), int(dev or 1)))
        if not targets:
            raise app.UsageError("give --targets name=url@devices or --launch colocated,disagg,pd")
        res = sweep(targets)
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    for path in filter(None, [os.path.dirname(FLAGS.json), os.path.dirname(FLAGS.png)]):
        os.makedirs(path, exist_ok=True)
    with open(FLAGS.json, "w") as f:
        json.dump(res, f, indent=1)
    pareto_png(res, FLAGS.png)
    print(f"wrote {FLAGS.json} and {FLAGS.png}")


if __name__ == "__main__":
    app.run(main)

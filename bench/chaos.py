"""Chaos soak: router + 2 prefill + 2 decode workers + the OpenAI server under a bounded request loop, with faults.

    python -m bench.chaos --minutes=30 [--checkpoint=DIR] [--clients=4] [--out=runs/chaos.json]

Faults, one at a time, every `--fault_every_s` (each recovered before the next): kill -9 of a worker (restarted),
SIGSTOP of a worker past the router's dead-after (a hung worker; SIGCONT after), a graceful restart (SIGTERM, drain,
start), control messages delayed (a TCP fault proxy between the router and that worker holds every chunk) and
dropped (the proxy cuts the worker's connections), and corrupted KV pages (decode workers run with
`--fault_corrupt_pages`: a share of pulls arrive with a flipped bit, which the checksum must catch).

Checked continuously: every request reaches a terminal state (a completion or an HTTP error) within `--bound_s`;
every completed greedy output equals the reference (the same prompt served before any fault). At the end: every
worker back, no page or lease held on any of them. Prints requests, faults by kind, terminal states and the max
time to a terminal state; exits 1 on any violation.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from absl import app, flags

_MINUTES = flags.DEFINE_float("minutes", 1.0, "how long faults are injected")
_CKPT = flags.DEFINE_string("checkpoint", None, "checkpoint (default: a tiny generated one, f32)")
_CLIENTS = flags.DEFINE_integer("clients", 4, "concurrent clients")
_BOUND = flags.DEFINE_float("bound_s", 60.0, "every request must end within this")
_EVERY = flags.DEFINE_float("fault_every_s", 6.0, "seconds between faults")
_CORRUPT = flags.DEFINE_float("corrupt_pages", 0.05, "share of KV pulls corrupted on arrival (decode workers)")
_SEED = flags.DEFINE_integer("seed", 0, "fault and prompt choice")
_OUT = flags.DEFINE_string("out", None, "write the summary JSON here")
_EXE = flags.DEFINE_string("executable_cache_dir", os.path.expanduser("~/.cache/tandem/exe_chaos"),
                           "workers' executable cache (restarts load instead of compiling)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_NEW = 12


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, args: list[str], tmp: str, ready: str):
        self.name, self.args, self.ready = name, args, ready
        self.log = os.path.join(tmp, f"{name}.log")
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                   + os.environ.get("TANDEM_TEST_XLA_FLAGS", ""), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        self.p = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, env=env, stdout=open(self.log, "a"),
                                  stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float, count: int = 1) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with open(self.log) as f:
                if f.read().count(self.ready) >= count:
                    return
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited rc={self.p.returncode}: {open(self.log).read()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready in {timeout:.0f}s")

    def restart(self) -> None:
        """Start again and wait for this incarnation's READY line."""
        with open(self.log) as f:
            seen = f.read().count(self.ready)
        self.start()
        self.wait_ready(300, count=seen + 1)

    def signal(self, sig) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=10)


class FaultProxy:
    """127.0.0.1 TCP proxy in front of one worker's control port: `delay_s` holds every chunk; `cut()` drops every
    open connection (the router's ZeroMQ reconnects)."""

    def __init__(self, target_port: int):
        self.target, self.delay_s = target_port, 0.0
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=2)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                if self.delay_s:
                    time.sleep(self.delay_s)
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def _complete(url: str, prompt: list[int], timeout: float) -> dict:
    body = json.dumps({"model": "chaos", "prompt": prompt, "max_tokens": N_NEW, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        ch = out["choices"][0]
        return {"ok": True, "text": ch["text"], "finish": ch["finish_reason"], "s": time.monotonic() - t0}
    except urllib.error.HTTPError as e:
        return {"ok": False, "error": f"HTTP {e.code}: {e.read()[:200]!r}", "s": time.monotonic() - t0}
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "s": time.monotonic() - t0, "timeout": True}


def _stats(port: int, token: str) -> dict:
    sys.path.insert(0, ROOT)
    import zmq

    from serving.protocol import decode_message, encode_message

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send(encode_message("stats", token))
        if not s.poll(5000):
            raise TimeoutError(f"worker :{port} did not answer stats in 5 s")
        return decode_message(s.recv(), token)
    finally:
        s.close()


def main(argv):
    del argv
    rng = random.Random(_SEED.value)
    tmp = tempfile.mkdtemp(prefix="tandem-chaos-")
    token = "chaos-token"
    os.environ["TANDEM_TOKEN"] = token
    ckpt = _CKPT.value
    if ckpt is None:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import hf_reference

        ckpt = os.path.join(tmp, "ckpt")
        hf_reference.build(ckpt, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
        hf_reference.write_tokenizer(ckpt)
    common = [f"--checkpoint={ckpt}", "--dtype=float32", "--page_size=8", "--num_pages=64", "--max_model_len=64",
              "--prefill_buckets=8,16", "--decode_buckets=2,4", "--decode_steps=3", "--lease_s=10",
              "--pull_timeout_s=5", f"--executable_cache_dir={_EXE.value}", "--drain_timeout_s=20"]
    workers, proxies = {}, {}
    for name in ("P1", "P2", "D1", "D2"):
        port = _port()
        role = "prefill" if name[0] == "P" else "decode"
        extra = [f"--fault_corrupt_pages={_CORRUPT.value}"] if role == "decode" else []
        workers[name] = Proc(name, ["-m", "serving.worker", f"--role={role}", f"--port={port}", *common, *extra], tmp,
                             "TANDEM_WORKER_READY")
        workers[name].port = port
        proxies[name] = FaultProxy(port)
    rport, sport = _port(), _port()
    router = Proc("router", ["-m", "serving.router", f"--port={rport}", "--dead_after_s=3", "--step_timeout_s=10",
                             "--max_retries=4", "--unavailable_timeout_s=20", "--workers="
                             + ",".join(f"127.0.0.1:{p.port}" for p in proxies.values())], tmp, "TANDEM_ROUTER_READY")
    server = Proc("server", ["-m", "serving.server", f"--router=127.0.0.1:{rport}", f"--port={sport}",
                             f"--checkpoint={ckpt}", "--served_model_name=chaos"], tmp, "Uvicorn running")
    procs = [*workers.values(), router, server]
    summary: dict = {}
    try:
        for p in workers.values():
            p.start()
        for p in workers.values():
            p.wait_ready(600)
        router.start()
        router.wait_ready(60)
        server.start()
        server.wait_ready(120)
        url = f"http://127.0.0.1:{sport}"
        prompts = [[rng.randrange(2, 90) for _ in range(rng.randrange(3, 30))] for _ in range(16)]
        reference = {}
        for i, p in enumerate(prompts):   # before any fault: what every later completion must equal
            r = _complete(url, p, _BOUND.value)
            if not r["ok"]:
                raise RuntimeError(f"reference request failed before any fault: {r}")
            reference[i] = r["text"]
        results, stop = [], threading.Event()

        def client(k: int):
            crng = random.Random(k)
            while not stop.is_set():
                i = crng.randrange(len(prompts))
                r = _complete(url, prompts[i], _BOUND.value + 5)
                r["prompt"] = i
                results.append(r)

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(_CLIENTS.value)]
        for t in threads:
            t.start()
        faults = collections.Counter()
        kinds = ["kill", "stop", "restart", "delay", "drop"]
        rng.shuffle(kinds)   # every kind within any five faults in a row
        end = time.monotonic() + 60 * _MINUTES.value
        for n in itertools.count():
            if time.monotonic() >= end:
                break
            time.sleep(_EVERY.value)
            name = rng.choice(sorted(workers))
            w, kind = workers[name], kinds[n % len(kinds)]
            if kind == "kill":
                w.signal(signal.SIGKILL)
                w.p.wait(timeout=10)
                w.restart()
            elif kind == "stop":
                w.signal(signal.SIGSTOP)
                time.sleep(4.0)   # past the router's dead-after (3 s): declared dead, requests migrate
                w.signal(signal.SIGCONT)
            elif kind == "restart":
                w.signal(signal.SIGTERM)
                rc = w.p.wait(timeout=40)
                if rc != 0:
                    faults["restart_unclean"] += 1
                w.restart()
            elif kind == "delay":
                proxies[name].delay_s = 0.3
                time.sleep(3.0)
                proxies[name].delay_s = 0.0
            else:
                proxies[name].cut()
            faults[kind] += 1
            print(f"[chaos] {time.strftime('%H:%M:%S')} {kind} {name}; {len(results)} requests so far", flush=True)
        stop.set()
        for t in threads:
            t.join(_BOUND.value + 10)
        leaks, corrupt = {}, 0
        for name, w in workers.items():   # settle: unacknowledged leases expire (--lease_s), aborts land
            deadline = time.monotonic() + 15
            while True:
                h = _stats(w.port, token)
                p = h["pages"]
                clean = h["invariant_ok"] and p["free"] == p["total"] and p["leased"] == 0 and p["used"] == 0
                if clean or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            corrupt += h["metrics"].get("checksum_failures", 0)
            if not clean:
                leaks[name] = p
        faults["corrupt_pages_caught (surviving incarnations)"] = corrupt
        done = [r for r in results if r["ok"] and r["finish"] != "error"]   # "error": a terminal state, no output
        mismatches = [r for r in done if r["text"] != reference[r["prompt"]]]
        late = [r for r in results if r["s"] > _BOUND.value or r.get("timeout")]
        states = collections.Counter(r["finish"] if r["ok"] else r["error"].split(":")[0] for r in results)
        with open(router.log) as f:   # why requests that ended in "error" gave up (the router says)
            gave_up = [ln.strip()[-300:] for ln in f if "gave up after" in ln][:20]
        summary = {"errors": gave_up, "minutes": _MINUTES.value, "requests": len(results), "completed": len(done),
                   "terminal_states": dict(states), "faults": dict(faults), "mismatches": len(mismatches),
                   "over_bound": len(late), "max_time_to_terminal_s": round(max((r["s"] for r in results),
                                                                                default=0), 2),
                   "leaks": leaks, "ok": not (mismatches or late or leaks) and len(done) > 0}
    finally:
        for p in procs:
            p.stop()
        for px in proxies.values():
            px.lsock.close()
        shutil.rmtree(tmp, ignore_errors=True) if summary.get("ok") else print(f"[chaos] logs kept in {tmp}")
    print("CHAOS_SUMMARY " + json.dumps(summary), flush=True)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    app.run(main)

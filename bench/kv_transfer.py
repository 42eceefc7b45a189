"""KV transfer between two processes vs raw loopback TCP for the same bytes, and TTFT split of a small PD run.

    python -m bench.kv_transfer [--sizes_mb=4,16,64] [--reps=5] [--ttft_requests=16] [--checkpoint DIR]

Part 1 (one run, same two processes): a child process offers float32 arrays of each size; the parent pulls them
with (a) `jax.experimental.transfer` (JaxTransport.pull, device -> device), (b) TcpTransport (msgpack header +
raw bytes, then device_put) and (c) raw TCP `sendall` -> `recv_into` a preallocated buffer (the ceiling).
Part 2: one prefill and one decode worker process + the in-process router; per request TTFT split into
queue (router), prefill (prefill worker), transfer (pull + checksum + reshard on the decode worker) and the rest.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_SIZES = flags.DEFINE_list("sizes_mb", ["4", "16", "64"], "array sizes (MB) to move")
_REPS = flags.DEFINE_integer("reps", 5, "repetitions per size and transport (median reported)")
_SERVE = flags.DEFINE_string("serve", None, "internal: run as the sending child, control on this port")
_TTFT = flags.DEFINE_integer("ttft_requests", 16, "requests for the TTFT split (0: skip)")
_CKPT = flags.DEFINE_string("checkpoint", None, "checkpoint for the TTFT run (default: a tiny one built here)")
_TRANSPORT = flags.DEFINE_string("ttft_transport", "jax", "transport of the TTFT run's workers")
_LENGTHS = flags.DEFINE_list("lengths", ["32", "128", "240"], "prompt lengths of the PD-vs-colocated latency table "
                             "(one request at a time; empty: skip)")
_REPEATS = flags.DEFINE_integer("length_repeats", 5, "requests per prompt length and side (median reported)")
_ROUNDS = flags.DEFINE_integer("stream_rounds", 2, "alternating rounds of PD with KV streaming off / on")
_OVERRIDES = flags.DEFINE_string("ckpt_overrides", "{}", "JSON config overrides of the tiny checkpoint built here "
                                 "(e.g. DeepSeek's latent: '{\"kv_lora_rank\": 512, \"qk_rope_head_dim\": 64}')")
_MML = flags.DEFINE_integer("max_model_len", 256, "the workers' and the colocated engine's max_model_len")
_BUCKETS = flags.DEFINE_list("prefill_buckets", ["32", "128"], "prefill chunk buckets (a longer prompt is chunked: "
                             "what KV streaming overlaps)")

MB = 1 << 20


def _child(port: int) -> int:
    import jax
    import jax.numpy as jnp
    import msgpack
    import zmq

    from serving.transfer import JaxTransport, TcpTransport

    jt, tt = JaxTransport(), TcpTransport()
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(4)
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(f"tcp://127.0.0.1:{port}")
    arrays = {}
    while True:
        if not sock.poll(120_000):
            return 1
        cmd = msgpack.unpackb(sock.recv())
        op = cmd["op"]
        if op == "hello":
            sock.send(msgpack.packb({"jax": jt.address, "tcp": tt.address, "raw": raw.getsockname()[1]}))
        elif op == "offer":
            n = cmd["mb"] * MB // 4
            if n not in arrays:
                arrays[n] = jax.device_put(jnp.arange(n, dtype=jnp.float32), jax.devices()[0]).block_until_ready()
            x = arrays[n]
            (jt if cmd["t"] == "jax" else tt).offer(cmd["uuid"], [x])
            sock.send(msgpack.packb("ok"))
        elif op == "release":
            (jt if cmd["t"] == "jax" else tt).release(cmd["uuid"], consumed=True)
            sock.send(msgpack.packb("ok"))
        elif op == "raw":
            buf = np.asarray(arrays[cmd["mb"] * MB // 4]) if cmd["mb"] * MB // 4 in arrays else \
                np.zeros(cmd["mb"] * MB // 4, np.float32)
            sock.send(msgpack.packb("ok"))
            c, _ = raw.accept()
            with c:
                c.sendall(memoryview(buf).cast("B"))
                c.recv(1)
        elif op == "quit":
            sock.send(msgpack.packb("ok"))
            return 0


def _transfer_figures(rows: list[str]) -> None:
    import jax
    import jax.numpy as jnp
    import msgpack
    import zmq

    from serving.transfer import JaxTransport, TcpTransport, page_checksums

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    p = port.getsockname()[1]
    port.close()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    child = subprocess.Popen([sys.executable, "-m", "bench.kv_transfer", f"--serve={p}"], env=env)
    ctl = zmq.Context.instance().socket(zmq.REQ)
    ctl.connect(f"tcp://127.0.0.1:{p}")

    def call(**kw):
        ctl.send(msgpack.packb(kw))
        if not ctl.poll(120_000):
            raise TimeoutError("bench child did not answer")
        return msgpack.unpackb(ctl.recv())

    try:
        addrs = call(op="hello")
        jt, tt = JaxTransport(), TcpTransport()
        uid = iter(range(1, 1 << 30))
        dev = jax.devices()[0]
        rows.append("| MB | raw TCP GB/s | jax.experimental.transfer GB/s (vs raw) | TcpTransport GB/s (vs raw) | "
                    "TcpTransport without device_put | checksum ms (host) |")
        rows.append("|---:|---:|---:|---:|---:|---:|")
        for mb in map(int, _SIZES.value):
            n = mb * MB // 4
            spec = [jax.ShapeDtypeStruct((n,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(dev))]
            res = {"raw": [], "jax": [], "tcp": [], "tcp_host": []}
            buf = np.empty(n, np.float32)
            for rep in range(_REPS.value + 1):          # rep 0 warms connections and buffers
                for t in ("raw", "jax", "tcp", "tcp_host"):
                    if t == "raw":
                        call(op="raw", mb=mb)
                        t0 = time.perf_counter()
                        with socket.create_connection(("127.0.0.1", addrs["raw"])) as s:
                            mv, got = memoryview(buf).cast("B"), 0
                            while got < len(mv):
                                got += s.recv_into(mv[got:])
                            dt = time.perf_counter() - t0
                            s.sendall(b"k")
                    else:
                        u, kind = next(uid), t.split("_")[0]
                        call(op="offer", t=kind, mb=mb, uuid=u)
                        t0 = time.perf_counter()
                        if t == "tcp_host":   # the same pull without the final device_put
                            out = tt.pull_host(addrs["tcp"], u, 60.0)
                        else:
                            out = (jt if t == "jax" else tt).pull(addrs[t], u, spec, 60.0)
                            jax.block_until_ready(out)
                        dt = time.perf_counter() - t0
                        call(op="release", t=kind, uuid=u)
                        if rep == 0:
                            assert float(out[0][n - 1]) == float(n - 1), "wrong data"
                    if rep:
                        res[t].append(mb * MB / dt / 1e9)
            t0 = time.perf_counter()
            page_checksums(buf.reshape(1, -1, 1024), axis=1)
            ck = (time.perf_counter() - t0) * 1e3
            med = {k: float(np.median(v)) for k, v in res.items()}
            rows.append(f"| {mb} | {med['raw']:.2f} | {med['jax']:.2f} ({med['jax'] / med['raw']:.0%}) | "
                        f"{med['tcp']:.2f} ({med['tcp'] / med['raw']:.0%}) | "
                        f"{med['tcp_host']:.2f} ({med['tcp_host'] / med['raw']:.0%}) | {ck:.1f} |")
            print(rows[-1], flush=True)
        call(op="quit")
    finally:
        if child.poll() is None:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10)


def _ttft_split(rows: list[str]) -> None:
    from serving import LLM, SamplingParams
    from serving.router import RouterConfig

    tmp = tempfile.mkdtemp(prefix="kvbench-")
    ckpt = _CKPT.value
    if ckpt is None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        import hf_reference

        ckpt = os.path.join(tmp, "ckpt")
        hf_reference.build(ckpt, {"num_hidden_layers": 2, "max_position_embeddings": max(256, _MML.value),
                                  **json.loads(_OVERRIDES.value)}, seed=11)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    pages = 4 * _MML.value // 16 + 1
    common = [f"--checkpoint={ckpt}", "--page_size=16", f"--num_pages={pages}", f"--max_model_len={_MML.value}",
              f"--prefill_buckets={','.join(_BUCKETS.value)}", "--decode_buckets=4,8", "--decode_steps=4",
              f"--transport={_TRANSPORT.value}",
              f"--compilation_cache_dir={os.path.expanduser('~/.cache/tandem/xla_bench_cache')}"]
    procs, addrs = [], []
    for role in ("prefill", "decode"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        procs.append(subprocess.Popen([sys.executable, "-m", "serving.worker", f"--role={role}", f"--port={port}",
                                       *common], env=env, stdout=subprocess.DEVNULL))
        addrs.append(f"127.0.0.1:{port}")
    try:
        rng = np.random.default_rng(0)
        split = RouterConfig(max_prefill_inflight=1 << 20, early_first_token=False)   # (the transfer is in TTFT)
        with LLM(workers=addrs, router_config=split, ready_timeout_s=600) as llm:
            for _ in range(2):  # every worker's health must be in before timing
                llm.backend.router.wait_until(lambda s: all(w["alive"] for w in s["workers"].values()), 600)
            llm.generate([[1, 2, 3] * 10], SamplingParams(max_tokens=2))  # warm the path
            prompts = [rng.integers(1, 90, int(n)).tolist() for n in rng.integers(64, 200, _TTFT.value)]
            reqs = [llm.submit(p, SamplingParams(max_tokens=16, ignore_eos=True)) for p in prompts]
            for _ in llm._stream(reqs):
                pass
        rm = [r.router_metrics for r in reqs]
        assert all(not x["local_prefill"] and x["transfer_s"] for x in rm), rm
        parts = {"queue: router": [x["queue_s"] for x in rm],
                 "queue: prefill worker": [x["prefill_queue_s"] for x in rm],
                 "prefill compute (prefill worker)": [x["prefill_s"] for x in rm],
                 "transfer (pull + checksum + reshard, decode worker)": [x["transfer_s"] for x in rm],
                 "rest (control hops, wait for a decode slot, insert, first-token message)":
                     [x["ttft_s"] - x["queue_s"] - x["prefill_queue_s"] - x["prefill_s"] - x["transfer_s"]
                      for x in rm],
                 "TTFT (router clock)": [x["ttft_s"] for x in rm]}
        rows.append("")
        rows.append(f"TTFT split, {len(rm)} requests (prompts 64-199 tokens, arrive at once), 1 prefill + 1 decode "
                    f"worker process, transport {_TRANSPORT.value}, first token after the transfer:")
        rows.append("")
        rows.append("| part | mean ms | p50 ms | p90 ms |")
        rows.append("|---|---:|---:|---:|")
        for k, v in parts.items():
            v = np.asarray(v, float) * 1e3
            rows.append(f"| {k} | {v.mean():.1f} | {np.percentile(v, 50):.1f} | {np.percentile(v, 90):.1f} |")
        print("\n".join(rows[-len(parts) - 2:]), flush=True)
        pd = {False: [], True: []}   # KV streamed during prefill off / on, alternating rounds
        for _ in range(_ROUNDS.value):
            for stream in (False, True):
                with LLM(workers=addrs, router_config=RouterConfig(kv_stream=stream), ready_timeout_s=600) as llm:
                    llm.backend.router.wait_until(lambda s: all(w["alive"] for w in s["workers"].values()), 600)
                    pd[stream].append(_by_length(llm, rng))
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    if not pd[True]:
        return
    import checkpoints
    import jax.numpy as jnp
    from serving import EngineConfig

    ec = EngineConfig(page_size=16, num_pages=pages, max_model_len=_MML.value, decode_buckets=(4, 8), decode_steps=4,
                      prefill_buckets=tuple(int(b) for b in _BUCKETS.value))
    with LLM(model=checkpoints.load(ckpt, dtype=jnp.float32), engine_config=ec) as llm:
        co = _by_length(llm, rng)
    for how, pick in (("worst", max), ("median", np.median)):
        by = {k: {n: tuple(float(pick([r[n][i] for r in v])) for i in range(3)) for n in v[0]} for k, v in pd.items()}
        rows += ["", "One request at a time, PD (1 prefill + 1 decode worker process, early first token; KV streamed "
                 f"during prefill off / on) vs colocated (one in-process engine, same config); PD: {how} of "
                 f"{_ROUNDS.value} alternating rounds of the median of {_REPEATS.value}, colocated: median of "
                 f"{_REPEATS.value}:", "",
                 "| prompt tokens | TTFT colocated | TTFT PD off / on | 2nd chunk colocated | 2nd chunk PD off / on | "
                 "PD - colocated off / on | KV pull on the decode worker off / on |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for n in co:
            (t_c, s_c, _), (t_0, s_0, x_0), (t_1, s_1, x_1) = co[n], by[False][n], by[True][n]
            rows.append(f"| {n} | {t_c:.1f} ms | {t_0:.1f} / {t_1:.1f} ms | {s_c:.1f} ms | {s_0:.1f} / {s_1:.1f} ms | "
                        f"{s_0 - s_c:+.1f} / {s_1 - s_c:+.1f} ms | {x_0:.1f} / {x_1:.1f} ms |")
        print("\n".join(rows[-len(co) - 4:]), flush=True)


def _by_length(llm, rng) -> dict[int, tuple[float, float, float]]:
    """{prompt length: median (TTFT, time to the second streamed chunk, KV transfer) in ms}, one request at a time."""
    from serving import SamplingParams

    out = {}
    llm.generate([[1, 2, 3] * 10], SamplingParams(max_tokens=8, ignore_eos=True))   # warm the path
    for n in (int(x) for x in _LENGTHS.value if x):
        got = []
        for _ in range(_REPEATS.value):
            o = llm.generate([rng.integers(1, 90, n).tolist()], SamplingParams(max_tokens=8, ignore_eos=True))[0]
            m = o.metrics
            got.append((m.ttft_s, m.ttft_s + (m.itl_s[0] if m.itl_s else float("nan")), m.transfer_s or 0.0))
        out[n] = tuple(float(np.median([g[i] for g in got]) * 1e3) for i in range(3))
    return out


def main(argv):
    del argv
    if _SERVE.value:
        return _child(int(_SERVE.value))
    rows: list[str] = []
    _transfer_figures(rows)
    if _TTFT.value:
        _ttft_split(rows)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    app.run(main)

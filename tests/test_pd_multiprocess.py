"""Multi-process PD: worker processes on 127.0.0.1, the router, leases, checksums, auth and fault tolerance.

Workers are real `python -m serving.worker` processes (1 CPU device each) sharing one small checkpoint and a
persistent compilation cache; readiness is a control-plane health reply (bounded), never a sleep. Every fault
test bounds the time until every request has finished or failed with a reason.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import zmq

import checkpoints
import hf_reference
from serving import LLM, EngineConfig, SamplingParams
from serving.protocol import decode_message, encode_message
from serving.router import RouterConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-secret-token"
EC = EngineConfig(page_size=8, num_pages=48, max_model_len=64, prefill_buckets=(8, 16), decode_buckets=(2, 4),
                  decode_steps=3, prefill_tokens=16)
PROMPTS = [[5, 17, 3, 44, 12, 9, 61, 2, 30, 30, 7, 1, 88, 15, 4, 27, 51, 19, 6, 40],  # > largest bucket: chunked
           [3, 1, 4], [9, 2, 6, 5, 35, 8, 9, 7, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
N_NEW = 8
XLA_CACHE = os.environ.get("TANDEM_TEST_XLA_CACHE", os.path.expanduser("~/.cache/tandem/xla_test_cache"))
# worker processes with the same settings load each other's executables (serving.exec_cache): a test's restart
# skips tracing and lowering; entries of other source versions are stale and replaced
EXE_CACHE = os.environ.get("TANDEM_TEST_EXE_CACHE", os.path.expanduser("~/.cache/tandem/exe_test_cache"))
BOUND_S = 50.0   # every request of a fault test ends (finished or failed with a reason) within this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, role, ckpt, tmp, *extra, port=None):
        self.role, self.port = role, port or _free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "serving.worker", f"--role={role}", f"--port={self.port}",
                     f"--checkpoint={ckpt}", "--dtype=float32", "--page_size=8", "--num_pages=48", "--max_model_len=64",
                     "--prefill_buckets=8,16", "--decode_buckets=2,4", "--decode_steps=3", "--lease_s=15",
                     "--pull_timeout_s=5", f"--compilation_cache_dir={XLA_CACHE}",
                     f"--executable_cache_dir={EXE_CACHE}", *extra]
        self.log = os.path.join(tmp, f"{role}-{self.port}.log")
        self.start()

    def start(self):
        env = dict(os.environ, TANDEM_TOKEN=TOKEN,
                   XLA_FLAGS="--xla_force_host_platform_device_count=1 " + os.environ["TANDEM_TEST_XLA_FLAGS"],
                   PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
        self.p = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=open(self.log, "a"),
                                  stderr=subprocess.STDOUT)

    def kill(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=10)

    def tail(self):
        with open(self.log) as f:
            return f.read()[-3000:]


def control(addr, msg_type, token=TOKEN, raw=None, timeout=10.0, **fields):
    """One request/reply on a fresh DEALER (a test acting as a router); returns the decoded reply."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{addr}")
    try:
        if raw is not None:
            s.send_multipart(raw) if isinstance(raw, list) else s.send(raw)
        else:
            s.send(encode_message(msg_type, token, **fields))
        if not s.poll(int(timeout * 1000)):
            raise TimeoutError(f"{addr}: no reply to {msg_type or 'raw message'} within {timeout}s")
        return decode_message(s.recv(), TOKEN)
    finally:
        s.close(0)


def wait_ready(procs, timeout=150.0):
    end = time.monotonic() + timeout
    for w in procs:
        while True:
            if w.p.poll() is not None:
                raise RuntimeError(f"{w.role} worker {w.addr} exited ({w.p.returncode}):\n{w.tail()}")
            try:
                rep = control(w.addr, "health", timeout=1.0)   # a bounded wait for the reply, then re-ask
                assert rep["type"] == "health_ok" and rep["role"] == w.role
                break
            except TimeoutError:
                if time.monotonic() > end:
                    raise TimeoutError(f"{w.role} worker {w.addr} not ready in {timeout}s:\n{w.tail()}")


def check_drained(addrs):
    for a in addrs:
        h = control(a, "stats")
        p = h["pages"]
        assert h["invariant_ok"], (a, p)
        assert p["free"] + p["used"] + p["leased"] == p["total"], (a, p)
        assert p["free"] == p["total"] and p["leased"] == 0 and p["used"] == 0, (a, p)


def router_cfg(**kw):
    base = dict(token=TOKEN, heartbeat_s=0.25, dead_after_s=5.0, step_timeout_s=20.0, max_retries=2,
                unavailable_timeout_s=30.0)
    base.update(kw)
    return RouterConfig(**base)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pd_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
    hf_reference.write_tokenizer(path)   # (structured output needs one)
    return path


@pytest.fixture(scope="module")
def cluster(ckpt, tmp_path_factory):
    """1 prefill + 2 decode workers, started in parallel (shared by the module)."""
    tmp = str(tmp_path_factory.mktemp("pd_run"))
    procs = {"P": Proc("prefill", ckpt, tmp), "D1": Proc("decode", ckpt, tmp), "D2": Proc("decode", ckpt, tmp)}
    procs["tmp"] = tmp
    yield procs
    for k, w in procs.items():
        if k != "tmp" and w.p.poll() is None:
            w.kill()


@pytest.fixture(scope="module")
def colocated(ckpt, cluster):
    """The in-process colocated reference (built while the workers compile)."""
    model = checkpoints.load(ckpt, dtype=jnp.float32)
    llm = LLM(model=model, engine_config=EC)
    wait_ready([w for k, w in cluster.items() if k != "tmp"])
    yield llm
    llm.close()


REGEX = "[a-z]{3} [0-9]"


def test_1p1d_equals_colocated(ckpt, cluster, colocated):
    P, D = cluster["P"], cluster["D1"]
    params = [SamplingParams(max_tokens=N_NEW, logprobs=3, prompt_logprobs=2),
              SamplingParams(max_tokens=N_NEW, temperature=0.8, top_p=0.9, seed=123), SamplingParams(max_tokens=5),
              SamplingParams(max_tokens=N_NEW, repetition_penalty=1.5, presence_penalty=0.5, logprobs=1)]
    want = colocated.generate(PROMPTS, params)
    with LLM(workers=[P.addr, D.addr], router_config=router_cfg()) as llm:
        got = llm.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        same_logprobs(got, want)   # from the prefill worker (first token, prompt) and the decode worker
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
        m = llm.backend.router.snapshot()["metrics"]
        assert m["remote_prefills"] == len(PROMPTS) and m["transfers"] == len(PROMPTS), m
        assert m.get("local_prefills", 0) == 0 and m.get("retries", 0) == 0, m
        for o in got:
            assert o.metrics.ttft_s > 0 and o.metrics.transfer_s > 0 and o.metrics.queue_s >= 0
        # routing counts of both workers reach the frontend (health -> router -> LLM.expert_stats, /metrics)
        ex = llm.expert_stats()
        assert set(ex) == {P.addr, D.addr} and all(e["layers"] >= 1 and e["experts"] >= 2 for e in ex.values()), ex
    # structured output over worker processes: the prefill worker masks the first token, the decode worker the rest
    with LLM(workers=[P.addr, D.addr], router_config=router_cfg(), checkpoint=ckpt) as llm:
        outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=N_NEW, structured_output={"regex": REGEX}))
    assert all(re.fullmatch(REGEX, o.text) and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    check_drained([P.addr, D.addr])
    # freshly started workers served their first requests without compiling anything (all AOT at start-up)
    for w in (P, D):
        assert control(w.addr, "stats")["metrics"].get("compiles", 0) == 0, w.role


def test_1p1d_over_tcp_transport_equals_colocated(ckpt, cluster, colocated):
    """The `--transport=tcp` data plane between two real worker processes gives the colocated tokens."""
    tmp = cluster["tmp"]
    P, D = Proc("prefill", ckpt, tmp, "--transport=tcp"), Proc("decode", ckpt, tmp, "--transport=tcp")
    cluster["Ptcp"], cluster["Dtcp"] = P, D
    wait_ready([P, D])
    params = [SamplingParams(max_tokens=N_NEW), SamplingParams(max_tokens=N_NEW, temperature=0.8, seed=9),
              SamplingParams(max_tokens=5), SamplingParams(max_tokens=N_NEW)]
    want = colocated.generate(PROMPTS, params)
    with LLM(workers=[P.addr, D.addr], router_config=router_cfg()) as llm:
        got = llm.generate(PROMPTS, params)
        m = llm.backend.router.snapshot()["metrics"]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert m["transfers"] == len(PROMPTS) and m.get("retries", 0) == 0, m
    assert control(D.addr, "stats")["engine"]["transport"] == "tcp"
    check_drained([P.addr, D.addr])
    P.kill(), D.kill()


def same_logprobs(got, want):
    for g, w in zip(got, want):
        for a, b in ((g.logprobs, w.logprobs), (g.prompt_logprobs, w.prompt_logprobs)):
            assert (a is None) == (b is None) and len(a or ()) == len(b or ())
            for x, y in zip(a or (), b or ()):
                assert (x is None and y is None) or (abs(x.logprob - y.logprob) < 1e-4
                                                     and [t for t, _ in x.top] == [t for t, _ in y.top])


def test_short_prompts_prefill_locally(cluster, colocated):
    P, D = cluster["P"], cluster["D1"]
    sp = SamplingParams(max_tokens=N_NEW, logprobs=2, prompt_logprobs=1)
    want = colocated.generate(PROMPTS, sp)
    with LLM(workers=[P.addr, D.addr], router_config=router_cfg(local_prefill_threshold=9)) as llm:
        got = llm.generate(PROMPTS, sp)
        m = llm.backend.router.snapshot()["metrics"]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    same_logprobs(got, want)
    assert m["local_prefills"] == 2 and m["remote_prefills"] == 2, m   # the 3- and 9-token prompts stay local
    check_drained([P.addr, D.addr])


def test_1p2d_concurrent_load(cluster, colocated):
    P, D1, D2 = cluster["P"], cluster["D1"], cluster["D2"]
    prompts = [PROMPTS[i % len(PROMPTS)] + [i + 1] for i in range(12)]
    want = colocated.generate(prompts, SamplingParams(max_tokens=N_NEW))
    with LLM(workers=[P.addr, D1.addr, D2.addr], router_config=router_cfg(max_prefill_inflight=2)) as llm:
        t0 = time.perf_counter()
        got = llm.generate(prompts, SamplingParams(max_tokens=N_NEW))
        dt = time.perf_counter() - t0
        m = llm.backend.router.snapshot()["metrics"]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # 12 at once against a prefill pool that takes 2: the overflow prefills on the decode workers (saturation)
    assert m["transfers"] + m["local_prefills"] == len(prompts) and m.get("retries", 0) == 0, m
    assert m["transfers"] >= 2 and m["local_prefills"] >= 1, m
    assert dt < BOUND_S
    check_drained([P.addr, D1.addr, D2.addr])


def test_kv_aware_routing_sends_a_repeated_prefix_to_the_prefill_worker_that_cached_it(ckpt, cluster, colocated):
    """Two prefill workers with --prefix_caching publish their cache events; requests sharing a system prompt
    all land on the one that prefilled it first and reuse its pages (same tokens as colocated)."""
    tmp = cluster["tmp"]
    P1, P2 = Proc("prefill", ckpt, tmp, "--prefix_caching"), Proc("prefill", ckpt, tmp, "--prefix_caching")
    cluster["Pkv1"], cluster["Pkv2"] = P1, P2
    wait_ready([P1, P2])
    D = cluster["D1"]
    system = [(7 * i + 3) % 90 + 5 for i in range(24)]
    prompts = [system + [11, 4, 9], system + [8, 8], system + [3, 14, 15, 92], system + [60]]
    want = colocated.generate(prompts, SamplingParams(max_tokens=N_NEW))
    with LLM(workers=[P1.addr, P2.addr, D.addr], router_config=router_cfg()) as llm:
        # one at a time, so load never outweighs the cached prefix; the offer carries the worker's cache events,
        # so the router's index is current before the next request is dispatched
        got = [llm.generate([p], SamplingParams(max_tokens=N_NEW))[0] for p in prompts]
        m = llm.backend.router.snapshot()["metrics"]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    stats = {w.addr: control(w.addr, "stats") for w in (P1, P2)}
    hits = {a: (s["prefix_cache"] or {}).get("hits_device", 0) for a, s in stats.items()}
    assert sorted(hits.values()) == [0, 9], hits                # 3 later requests x 3 cached blocks, one worker
    assert m["kv_routed_requests"] == 3 and m["kv_routed_blocks"] == 9, m
    for a, s in stats.items():
        p = s["pages"]
        assert s["invariant_ok"] and p["free"] + p["cached"] == p["total"] and p["used"] == p["leased"] == 0, p
    P1.kill(), P2.kill()


def test_a_decode_worker_caching_the_prompts_blocks_receives_only_the_pages_after_them(ckpt, cluster, colocated):
    """Multi-turn over PD: turn 2 starts with turn 1 and its answer, which the decode worker (--prefix_caching)
    cached when turn 1 finished and reported with its last tokens; the router sends turn 2 there and the prefill
    worker offers only the pages after the cached ones. And a decode worker that does not hold the pages an offer
    leaves out (evicted since) prefills the request itself. Tokens equal colocated in both."""
    tmp, P, D1 = cluster["tmp"], cluster["P"], cluster["D1"]
    D = Proc("decode", ckpt, tmp, "--prefix_caching")
    cluster["Dpc"] = D
    wait_ready([D])
    sp = SamplingParams(max_tokens=N_NEW, ignore_eos=True)
    turn1 = [(5 * i + 2) % 90 + 5 for i in range(20)]
    out1 = colocated.generate([turn1], sp)[0].token_ids
    turn2 = turn1 + out1 + [9, 14, 22, 7, 3]             # 33 tokens: its first 3 blocks of 8 are turn 1's KV
    want = colocated.generate([turn2], sp)[0].token_ids
    with LLM(workers=[P.addr, D.addr], router_config=router_cfg()) as llm:
        assert llm.generate([turn1], sp)[0].token_ids == out1
        assert llm.generate([turn2], sp)[0].token_ids == want
        m = llm.backend.router.snapshot()["metrics"]
    assert m["transfers"] == 2 and m["kv_pages_not_sent"] == 3 and m.get("retries", 0) == 0, m
    assert control(D.addr, "stats")["metrics"]["pages_not_sent"] == 3
    # acting as the router: an offer leaving out 3 pages, sent to a decode worker that never cached them
    wire = {"seed": 0, "max_tokens": N_NEW, "ignore_eos": True}
    off = control(P.addr, "prefill", rid="fb#0", prompt=turn2, sampling=wire, uuid=737373, skip=3)
    assert off["type"] == "offered" and off["offer"]["skip"] == 3 and off["offer"]["n_pages"] == 2
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{D1.addr}")
    s.send(encode_message("decode", TOKEN, rid="fb#0", prompt=turn2, sampling=wire, limit=N_NEW, offer=off["offer"]))
    toks, done = [], False
    while not done:
        assert s.poll(30_000), toks
        r = decode_message(s.recv(), TOKEN)
        assert r["type"] != "error" and r.get("ok", True), r
        if r["type"] == "tokens":
            toks += r["tokens"]
            done = r["finished"]
    s.close(0)
    assert toks == want
    assert control(D1.addr, "stats")["metrics"]["reprefilled"] == 1
    assert control(P.addr, "release", uuid=737373, consumed=True)["type"] == "released"
    check_drained([P.addr, D1.addr])
    D.kill()


def test_kv_streamed_during_prefill_equals_colocated(cluster, colocated):
    """A long prompt's pages leave while it still prefills: after each chunk but the last the prefill worker offers
    the pages that chunk finished (`part`), the router has the decode worker that will get the request pull them
    (`prepull`), and the offer carries only the pages after them. Tokens equal colocated, every part was pulled
    ahead, nothing stays offered; with kv_stream off nothing is streamed and the tokens are the same."""
    P, D = cluster["P"], cluster["D1"]
    long = [(7 * i + 3) % 90 + 5 for i in range(50)]    # chunks 16/16/16/2: parts of pages 0-1, 2-3, 4-5; offer: 6
    prompts, sp = [long, PROMPTS[0]], SamplingParams(max_tokens=N_NEW, ignore_eos=True)   # (20 tokens: 1 part)
    want = [o.token_ids for o in colocated.generate(prompts, sp)]
    drains = control(P.addr, "stats")["load"]["drains"]
    for stream in (True, False):
        before = [control(w.addr, "stats")["metrics"] for w in (P, D)]
        with LLM(workers=[P.addr, D.addr], router_config=router_cfg(kv_stream=stream)) as llm:
            assert [o.token_ids for o in llm.generate(prompts, sp)] == want, stream
            m = llm.backend.router.snapshot()["metrics"]
        after = [control(w.addr, "stats")["metrics"] for w in (P, D)]
        offered, early = (after[i].get(k, 0) - before[i].get(k, 0) for i, k in ((0, "parts_offered"),
                                                                                   (1, "parts_pulled_early")))
        assert m["transfers"] == 2 and m.get("retries", 0) == 0, m
        assert (m.get("kv_parts_streamed", 0), offered, early) == ((4, 4, 4) if stream else (0, 0, 0)), (m, stream)
        check_drained([P.addr, D.addr])
    load = control(P.addr, "stats")["load"]
    assert load["offers"] == 0   # every part's transport offer ended with its lease ...
    assert load["drains"] == drains   # ... as consumed (pulled), not drained as abandoned


def test_http_server_over_worker_processes(cluster, colocated):
    """The OpenAI server in front of the router and worker processes: the openai client gets the colocated tokens,
    streaming and not, and the workers end drained."""
    import openai

    from serving.openai_api import DEFAULT_CHAT_TEMPLATE
    from serving.server import EngineLoop, Server, build_app

    P, D = cluster["P"], cluster["D1"]
    want = colocated.generate(PROMPTS[:2], SamplingParams(max_tokens=N_NEW))
    with LLM(workers=[P.addr, D.addr], router_config=router_cfg()) as llm:
        eng = EngineLoop(llm)
        srv = Server(build_app(eng, model_name="tiny", chat_template=DEFAULT_CHAT_TEMPLATE)).start()
        try:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N_NEW, temperature=0)
            assert r.choices[0].model_extra["token_ids"] == want[0].token_ids
            chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=N_NEW, temperature=0,
                                               stream=True))
            assert [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]] == want[1].token_ids
        finally:
            srv.stop()
            eng.close()
    check_drained([P.addr, D.addr])


def test_one_trace_across_server_router_and_worker_processes(cluster):
    """Tracing on in the server's process (in-memory exporter): a disaggregated request over the worker processes
    gives one trace — its spans made in three processes (the workers' carried back on the control plane) — whose
    spans up to the first token (transfer and first decode included: early_first_token off) add up to the
    client's TTFT within 10%. With the early first token (the default) the same request's first token leaves
    before its KV transfer has ended, and the tokens are the same."""
    import httpx
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving import tracing
    from serving.openai_api import DEFAULT_CHAT_TEMPLATE
    from serving.server import EngineLoop, Server, build_app
    from trace_check import check_trace, stream_ttft, traced_request

    P, D = cluster["P"], cluster["D1"]
    prompt = PROMPTS[0] + PROMPTS[3] + PROMPTS[2]   # 40 tokens, 3 prefill chunks: TTFT well above the hops' ~2 ms
    services = {"tandem-server", "tandem-prefill-worker", "tandem-decode-worker"}
    body = {"prompt": prompt, "max_tokens": N_NEW, "temperature": 0, "cache_salt": "trace"}   # (salted: no hit)
    mem = InMemorySpanExporter()
    tracing.configure("tandem-server", exporter=mem)
    got = {}
    try:
        for early in (False, True):
            with LLM(workers=[P.addr, D.addr], router_config=router_cfg(early_first_token=early)) as llm:
                eng = EngineLoop(llm)
                srv = Server(build_app(eng, model_name="tiny", chat_template=DEFAULT_CHAT_TEMPLATE)).start()
                try:
                    with httpx.Client(timeout=60) as c:
                        stream_ttft(c, srv.url, {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0})   # (warm)
                        if early:
                            mem.clear()
                            ttft, ids = stream_ttft(c, srv.url, body)
                            by = check_trace(mem.get_finished_spans(), "workers_early", ttft, services)[0]
                        else:
                            by, ids = traced_request(c, srv.url, body, mem, "workers", services)
                        got[early] = by, ids
                finally:
                    srv.stop()
                    eng.close()
    finally:
        tracing.shutdown()
    by, ids = got[False]
    assert by["prefill"].resource.attributes["service.name"] == "tandem-prefill-worker"
    assert by["kv_transfer"].resource.attributes["service.name"] == "tandem-decode-worker"
    assert by["prefill"].attributes["tandem.prompt_tokens"] == len(prompt) and len(ids) == N_NEW
    early_by, early_ids = got[True]
    assert early_ids == ids
    assert early_by["deliver"].start_time < early_by["kv_transfer"].end_time   # it did not wait for the transfer
    check_drained([P.addr, D.addr])


def test_load_spreads_over_both_decode_workers(cluster):
    P, D1, D2 = cluster["P"], cluster["D1"], cluster["D2"]
    with LLM(workers=[P.addr, D1.addr, D2.addr], router_config=router_cfg()) as llm:
        reqs = [llm.submit(PROMPTS[i % 4], SamplingParams(max_tokens=N_NEW)) for i in range(8)]
        for _ in llm._stream(reqs):
            pass
        assert all(r.finish_reason == "length" for r in reqs)
        decoders = [r.workers[-1] for r in reqs]
    assert set(decoders) == {D1.addr, D2.addr}, decoders
    assert max(decoders.count(D1.addr), decoders.count(D2.addr)) <= 6, decoders


def test_malformed_and_unauthenticated_messages_are_rejected(cluster):
    for w in (cluster["P"], cluster["D1"]):
        before = control(w.addr, "stats")["metrics"]
        rep = control(w.addr, None, raw=b"\xc1\xff not msgpack")
        assert rep["type"] == "error" and rep["kind"] == "malformed" and "not msgpack" in rep["error"]
        rep = control(w.addr, None, raw=msgpack.packb([1, 2, 3]))
        assert rep["type"] == "error" and rep["kind"] == "malformed" and "expected a map" in rep["error"]
        rep = control(w.addr, None, raw=[b"a", b"b"])
        assert rep["type"] == "error" and rep["kind"] == "malformed" and "frame" in rep["error"]
        rep = control(w.addr, None, raw=msgpack.packb({"v": 1, "type": "prefill", "token": TOKEN, "rid": "x"}))
        assert rep["type"] == "error" and "lacks field 'prompt'" in rep["error"]
        rep = control(w.addr, "health", token="wrong")
        assert rep["type"] == "error" and rep["kind"] == "unauthenticated"
        rep = control(w.addr, "health", token=None)
        assert rep["type"] == "error" and rep["kind"] == "unauthenticated"
        rep = control(w.addr, "prefill" if w.role == "prefill" else "decode", rid="y", prompt=[1, 10_000],
                      sampling={"seed": 1}, uuid=5, limit=4)
        assert rep["type"] == "error" and "outside the vocabulary" in rep["error"]
        after = control(w.addr, "stats")           # still up, and it counted every rejection
        assert after["type"] == "health_ok"
        m = after["metrics"]
        assert m.get("rejected_malformed", 0) - before.get("rejected_malformed", 0) == 5
        assert m.get("rejected_unauthenticated", 0) - before.get("rejected_unauthenticated", 0) == 2
    rep = control(cluster["D1"].addr, "decode", rid="z", prompt=[1, 2, 3], sampling={"seed": 1}, limit=4,
                  offer={"addr": "127.0.0.1:1"})
    assert rep["type"] == "error" and "offer lacks" in rep["error"]
    check_drained([cluster["P"].addr, cluster["D1"].addr])


def test_checksum_detects_a_corrupted_page(cluster):
    from serving.transfer import ChecksumError, TcpTransport, page_checksums, verify_pages

    # data plane, in process: the bytes on the wire are corrupted after the checksums were taken
    pages = np.random.default_rng(0).standard_normal((2, 4, 8, 24)).astype(np.float32)
    sums = page_checksums(pages)
    bad = pages.copy()
    bad[1, 2, 5, 7] = np.nextafter(bad[1, 2, 5, 7], np.float32(np.inf))   # one ulp of one value of page 2
    a, b = TcpTransport(), TcpTransport()
    a.offer_host(7, [bad])
    (got,) = b.pull_host(a.address, 7, timeout_s=5)
    with pytest.raises(ChecksumError, match=r"page\(s\) \[2\]"):
        verify_pages(got, sums)
    verify_pages(pages, sums)
    a.close(), b.close()
    # end to end: a decode worker verifies what it pulled against the checksums in the control message
    P, D = cluster["P"], cluster["D1"]
    off = control(P.addr, "prefill", rid="cs#0", prompt=PROMPTS[0], sampling={"seed": 3, "max_tokens": 4},
                  uuid=424242)
    assert off["type"] == "offered"
    assert control(P.addr, "stats")["pages"]["leased"] == 3          # leased until acknowledged
    offer = dict(off["offer"])
    offer["checksums"] = list(offer["checksums"])
    offer["checksums"][1] ^= 1 << 7
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{D.addr}")
    s.send(encode_message("decode", TOKEN, rid="cs#0", prompt=PROMPTS[0], sampling={"seed": 3, "max_tokens": 4},
                          limit=4, offer=offer))
    replies = []
    while not any(r["type"] == "pulled" for r in replies):
        assert s.poll(20_000), replies
        replies.append(decode_message(s.recv(), TOKEN))
    s.close(0)
    pulled = [r for r in replies if r["type"] == "pulled"][0]
    assert not pulled["ok"] and "checksum mismatch on page(s) [1]" in pulled["error"]
    assert control(D.addr, "stats")["metrics"]["checksum_failures"] >= 1
    assert control(P.addr, "release", uuid=424242, consumed=True)["type"] == "released"
    check_drained([P.addr, D.addr])


def test_unacknowledged_lease_expires(ckpt, cluster, colocated):
    P = cluster["P"]
    off = control(P.addr, "prefill", rid="lease#0", prompt=PROMPTS[2], sampling={"seed": 1}, uuid=515151)
    assert off["type"] == "offered" and control(P.addr, "stats")["pages"]["leased"] == 2
    # nobody acknowledges; an abort (router's view: peer death) ends the lease at once
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(f"tcp://{P.addr}")
    s.send(encode_message("abort", TOKEN, rid="lease#0"))
    s.close(linger=1000)
    end = time.monotonic() + 10
    while control(P.addr, "stats")["pages"]["leased"]:
        assert time.monotonic() < end
    h = control(P.addr, "stats")
    assert h["metrics"]["leases_ended_abort"] >= 1
    check_drained([P.addr])


def _greedy_long(colocated, prompts, n):
    return colocated.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))


def test_kill_prefill_mid_transfer_then_restart_rejoins(ckpt, cluster, colocated):
    tmp = cluster["tmp"]
    Pk = Proc("prefill", ckpt, tmp)
    Ds = Proc("decode", ckpt, tmp, "--fault_pull_delay_s=1.5")   # widens the transfer window
    cluster["Pk"], cluster["Ds"] = Pk, Ds
    wait_ready([Pk, Ds])
    sp = SamplingParams(max_tokens=N_NEW, ignore_eos=True)
    want = colocated.generate(PROMPTS, sp)
    with LLM(workers=[Pk.addr, Ds.addr], router_config=router_cfg(step_timeout_s=10.0)) as llm:
        t0 = time.monotonic()
        reqs = [llm.submit(p, sp) for p in PROMPTS]
        llm.backend.router.wait_until(lambda s: any(r["state"] == "transferring" for r in s["requests"].values()), 30)
        Pk.kill()                                       # offers made, pulls not done: mid-transfer
        for _ in llm._stream(reqs):
            assert time.monotonic() - t0 < BOUND_S
        for r, w in zip(reqs, want):
            assert r.finish_reason in ("length", "error"), (r.finish_reason, r.error)
            if r.finish_reason == "length":
                assert r.output_ids == w.token_ids      # re-prefilled (locally: no prefill worker left)
            else:
                assert "gave up" in r.error or "transfer" in r.error, r.error
        assert sum(r.finish_reason == "length" for r in reqs) == len(reqs)   # retries suffice here
        snap = llm.backend.router.snapshot()
        assert snap["metrics"]["retries"] >= 1 and not snap["workers"][Pk.addr]["alive"]
        check_drained([Ds.addr])
        # the prefill worker restarts on the same port, rejoins and takes traffic again
        Pk.start()
        llm.backend.router.wait_until(lambda s: s["workers"][Pk.addr]["alive"], 120)
        before = llm.backend.router.snapshot()["metrics"]["remote_prefills"]
        outs = llm.generate(PROMPTS, sp)
        assert [o.token_ids for o in outs] == [w.token_ids for w in want]
        assert llm.backend.router.snapshot()["metrics"]["remote_prefills"] - before == len(PROMPTS)
    check_drained([Pk.addr, Ds.addr])


def test_kill_decode_mid_generation_migrates(ckpt, cluster, colocated):
    P, D1, D2 = cluster["P"], cluster["D1"], cluster["D2"]
    n = 40
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    want = _greedy_long(colocated, prompts, n)
    with LLM(workers=[P.addr, D1.addr, D2.addr], router_config=router_cfg()) as llm:
        t0 = time.monotonic()
        reqs = [llm.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
        llm.backend.router.wait_until(lambda s: any(r["decode"] == D1.addr and r["tokens"] >= 4 and r["state"] ==
                                             "decoding" for r in s["requests"].values()), 40)
        D1.kill()
        for _ in llm._stream(reqs):
            assert time.monotonic() - t0 < BOUND_S
        assert time.monotonic() - t0 < BOUND_S
        migrated = [r for r in reqs if len(set(r.workers) & {D1.addr}) and r.workers[-1] != D1.addr]
        assert migrated, [r.workers for r in reqs]
        for r, w in zip(reqs, want):
            assert r.finish_reason == "length", (r.finish_reason, r.error)
            assert r.output_ids == w.token_ids           # continued from prompt + generated tokens
        assert llm.backend.router.snapshot()["metrics"]["worker_deaths"] >= 1
        check_drained([P.addr, D2.addr])
        D1.start()
        llm.backend.router.wait_until(lambda s: s["workers"][D1.addr]["alive"], 120)
        reqs = [llm.submit(PROMPTS[i % 4], SamplingParams(max_tokens=N_NEW)) for i in range(6)]
        for _ in llm._stream(reqs):
            pass
        assert D1.addr in {r.workers[-1] for r in reqs}   # the restarted worker takes traffic
    # ... with executables loaded from the cache its first start (or its twin's) stored: no trace, lower, compile
    with open(D1.log) as f:
        ready = [json.loads(ln.split(" ", 1)[1]) for ln in f if ln.startswith("TANDEM_WORKER_READY ")]
    assert len(ready) == 2 and ready[-1]["executable_cache"]["misses"] == 0, ready
    assert ready[-1]["executable_cache"]["hits"] == sum(ready[0]["executable_cache"][k]
                                                         for k in ("hits", "misses", "stale", "corrupt"))
    check_drained([P.addr, D1.addr, D2.addr])


def test_rolling_restart_of_every_worker_under_load(ckpt, cluster, colocated):
    """SIGTERM each worker in turn (D1, P, D2) while requests keep arriving: it reports draining and gets nothing
    new, the requests running there finish there (not migrated), it exits 0, restarts (executables from the cache)
    and rejoins. Zero failed requests, every output equal to colocated greedy, leaves counted, no death."""
    P, D1, D2 = cluster["P"], cluster["D1"], cluster["D2"]
    n = 24
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    want = {tuple(p): o.token_ids for p, o in zip(prompts, _greedy_long(colocated, prompts, n))}
    with LLM(workers=[P.addr, D1.addr, D2.addr], router_config=router_cfg()) as llm:
        router = llm.backend.router
        t0 = time.monotonic()
        deaths = router.snapshot()["metrics"].get("worker_deaths", 0)
        submit = lambda: [llm.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
        reqs, stayed = [], {}
        for w in (D1, P, D2):
            reqs += submit()
            if w.role == "decode":   # requests decoding there at SIGTERM must finish there
                router.wait_until(lambda s: any(r["decode"] == w.addr and r["state"] == "decoding" and r["tokens"] >= 2
                                                for r in s["requests"].values()), 40)
                stayed.update({rid: w.addr for rid, r in router.snapshot()["requests"].items()
                               if r["decode"] == w.addr and r["state"] == "decoding" and r["tokens"] >= 2})
            w.p.send_signal(signal.SIGTERM)
            router.wait_until(lambda s: s["workers"][w.addr]["draining"] or not s["workers"][w.addr]["alive"], 20)
            reqs += submit()                                     # load continues; none of it goes to w
            assert w.p.wait(timeout=40) == 0, w.tail()           # finished its work, exited cleanly
            router.wait_until(lambda s: not s["workers"][w.addr]["alive"], 20)
            w.start()
            router.wait_until(lambda s: s["workers"][w.addr]["alive"], 120)
        reqs += submit()
        for _ in llm._stream(reqs):
            assert time.monotonic() - t0 < 240
        for r in reqs:
            assert r.finish_reason == "length", (r.finish_reason, r.error)
            assert r.output_ids == want[tuple(r.prompt_ids.tolist())]
        assert {a for a in stayed.values()} == {D1.addr, D2.addr}
        assert all(r.workers[-1] == stayed[r.id] for r in reqs if r.id in stayed), [r.workers for r in reqs]
        m = router.snapshot()["metrics"]
        assert m.get("workers_left") == 3 and m.get("worker_deaths", 0) == deaths, m   # leaves, not deaths
    check_drained([P.addr, D1.addr, D2.addr])


def test_no_worker_ends_with_a_clear_error(cluster):
    from serving.router import Router

    dead = f"127.0.0.1:{_free_port()}"

    r = Router([dead], router_cfg(unavailable_timeout_s=1.0))
    try:
        r.submit("lonely", [1, 2, 3], {"seed": 1, "max_tokens": 2})
        evs = []
        end = time.monotonic() + 10
        while not evs and time.monotonic() < end:
            evs = r.events(1.0)
        assert evs and evs[0]["finished"] and evs[0]["reason"] == "error"
        assert "no decode worker available" in evs[0]["error"]
    finally:
        r.close()


def test_prefill_worker_batches_its_queued_jobs(ckpt, colocated):
    """In process, deterministic: five queued prefill jobs of one bucket on a worker whose engine takes up to 4 rows
    run as one 4-row call and one 1-row call; every offer's first token equals colocated prefill's."""
    from serving.api import Request
    from serving.engine import Engine
    from serving.worker import Worker

    prompts = [[3, 1, 4], [2, 7, 1, 8, 2], [9, 9], [5, 17, 3, 44], [6, 2, 8]]
    want = [o.token_ids[0] for o in colocated.generate(prompts, SamplingParams(max_tokens=1))]
    ec = EngineConfig(**{**EC.__dict__, "prefill_rows": (1, 2, 4), "prefill_tokens": 32})
    eng = Engine(checkpoints.load(ckpt, dtype=jnp.float32), ec, name="prefill", roles={"prefill", "send"})
    w = Worker("prefill", eng, token=TOKEN)
    sent, rows, batch = [], [], eng.prefill_batch
    w.send = lambda ident, type_, **f: sent.append((type_, f))
    eng.prefill_batch = lambda items: rows.append(len(items)) or batch(items)
    try:
        for i, p in enumerate(prompts):
            req = Request(id=f"b{i}", prompt_ids=np.asarray(p, np.int32), params=SamplingParams(max_tokens=4),
                          seed=0, limit=4)
            req.arrival = time.perf_counter()
            w._jobs.append((b"router", req, 100 + i))
        while w._jobs:
            w._prefill_jobs()
        assert rows == [4, 1], rows
        assert w.metrics["prefill_calls"] == 2 and w.metrics["prefill_rows"] == 5
        offers = {f["rid"]: f["offer"] for t, f in sent if t == "offered"}
        assert [offers[f"b{i}"]["first_token"] for i in range(5)] == want
        for u in list(w.leases):
            w._end_lease(u, consumed=True, why="release")
        assert w.pages.allocator.used == 0 and w.pages.allocator.leased == 0
    finally:
        w.close()


def _ready_line(w) -> dict:
    with open(w.log) as f:
        return [json.loads(ln.split(" ", 1)[1]) for ln in f if ln.startswith("TANDEM_WORKER_READY ")][-1]


def test_a_new_worker_takes_its_weights_from_a_running_peer(ckpt, cluster, colocated):
    """`--weights_from`: a new decode worker pulls every weight from a running one (checksums checked on arrival)
    instead of reading the checkpoint, and serves the same tokens; with no peer answering, a worker reads the
    checkpoint after the bounded wait. (Last in the module: serving weights compiles the peer's checksum.)"""
    tmp, D2 = cluster["tmp"], cluster["D2"]
    Dn = Proc("decode", ckpt, tmp, f"--weights_from={D2.addr}")
    Px = Proc("prefill", ckpt, tmp, f"--weights_from=127.0.0.1:{_free_port()}", "--weights_timeout_s=2")
    try:
        wait_ready([Dn, Px])
        wn, wx = _ready_line(Dn)["weights"], _ready_line(Px)["weights"]
        assert wn["source"] == "peer" and wn["leaves"] > 10 and wn["bytes"] > 0, wn
        assert wx["source"] == "checkpoint" and "no answer" in wx["fallback"], wx
        with LLM(workers=[Px.addr, Dn.addr], router_config=router_cfg()) as llm:
            outs = llm.generate(PROMPTS, SamplingParams(max_tokens=N_NEW))
        want = colocated.generate(PROMPTS, SamplingParams(max_tokens=N_NEW))
        assert [o.token_ids for o in outs] == [o.token_ids for o in want]
        m = control(D2.addr, "stats")["metrics"]
        assert m.get("weights_offered") == m.get("weights_released") == 1, m   # the offer ended
        check_drained([Px.addr, Dn.addr])
    finally:
        Dn.kill()
        Px.kill()


def test_tcp_pull_lands_in_memory_the_cpu_device_adopts_without_a_copy():
    """A TcpTransport pull receives into 64-byte-aligned buffers, which XLA:CPU takes as device buffers as they are
    (the device_put after the pull copies nothing); the data arrives intact."""
    import jax

    from serving.transfer import TcpTransport, aligned_empty

    a = aligned_empty((3, 1000), np.float32)
    assert a.ctypes.data % 64 == 0 and a.shape == (3, 1000)
    assert jax.device_put(a).unsafe_buffer_pointer() == a.ctypes.data   # adopted, not copied
    src, dst = TcpTransport(), TcpTransport()
    try:
        x = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
        src.offer_host(7, [x])
        (got,) = dst.pull_host(src.address, 7, 10.0)
        assert got.ctypes.data % 64 == 0 and np.array_equal(got, x)
        assert jax.device_put(got).unsafe_buffer_pointer() == got.ctypes.data
    finally:
        src.close()
        dst.close()

"""RouterCore as a pure state machine: no processes, sockets, threads or sleeps.

A fake `send` records (addr, type, fields) and can be told to fail per worker, a fake `emit` collects the token
events, a fake clock is a float the test advances. Worker messages are built exactly as serving/worker.py sends
them and go through the protocol's encode/decode (so they are validated like real ones).
"""

import gc
import tracemalloc

import pytest

from serving.protocol import decode_message, encode_message
from serving.router_core import RouterConfig, RouterCore

P, P2, D1, D2 = "127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7201", "127.0.0.1:7202"
ENGINE = {"page_size": 8, "max_model_len": 64, "cache_shape": [2, 48, 8, 24], "cache_dtype": "float32",
          "vocab_size": 128, "eos_ids": [1], "transport": "jax", "transfer_addr": "127.0.0.1:9000"}
LONG = list(range(10, 30))      # 20 tokens
SHORT = [3, 1, 4]
SAMPLING = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 7, "stop": [],
            "stop_token_ids": [], "ignore_eos": True}


class Harness:
    """One RouterCore with recorded outputs and a fake monotonic clock."""

    def __init__(self, workers=(P, D1, D2), **cfg):
        self.now = 1000.0
        self.sent: list[tuple[str, str, dict]] = []
        self.failing: set[str] = set()
        self.events: list[dict] = []
        self.clients: list[object] = []
        self.reconnects: list[str] = []
        self.incarnation: dict[str, str] = {}
        self.roles: dict[str, str] = {}
        cfg = {"early_first_token": False, **cfg}   # (the tests below the classic path; one test the early token)
        self.core = RouterCore(list(workers), RouterConfig(**cfg), send=self.send, emit=self.emit,
                               reconnect=self.reconnects.append, uuid_start=500)

    # fakes
    def send(self, addr, type_, /, **fields) -> bool:
        encode_message(type_, None, **fields)        # what the core sends must be a valid message
        self.sent.append((addr, type_, fields))
        return addr not in self.failing

    def emit(self, ev, client) -> None:
        self.events.append(ev)
        self.clients.append(client)

    # driving
    def msg(self, addr, type_, **fields) -> None:
        m = decode_message(encode_message(type_, None, **fields))
        self.core.on_worker_message(addr, m, self.now)

    def health(self, addr, role=None, incarnation=None, load=None, **extra) -> None:
        role = role or self.roles[addr]
        inc = incarnation or self.incarnation.get(addr, "inc0")
        self.roles[addr], self.incarnation[addr] = role, inc
        self.msg(addr, "health_ok", role=role, worker=addr, incarnation=inc, ready=True,
                 pages={"free": 48, "used": 0, "leased": 0, "total": 48}, invariant_ok=True,
                 load=load or {"queued": 0, "leases": 0}, metrics={}, engine=ENGINE, **extra)

    def join(self, **roles) -> None:
        for addr, role in roles.items():
            self.health(addr, role)

    def tick(self, dt: float = 0.0, alive=()) -> bool:
        """Advance the clock; the workers in `alive` answer their heartbeat first."""
        self.now += dt
        for a in alive:
            self.health(a)
        return self.core.tick(self.now)

    def submit(self, rid, prompt=LONG, sampling=SAMPLING, limit=None, client=None) -> bool:
        return self.core.submit(rid, prompt, sampling, limit, client, self.now)

    def take(self, type_=None, addr=None) -> list[tuple[str, str, dict]]:
        """Pop the recorded sends (heartbeats excluded) matching type_/addr."""
        hit = [s for s in self.sent if s[1] != "health" and (type_ is None or s[1] == type_)
               and (addr is None or s[0] == addr)]
        self.sent = [s for s in self.sent if s not in hit and s[1] != "health"]
        return hit

    def one(self, type_, addr=None) -> dict:
        hit = self.take(type_, addr)
        assert len(hit) == 1, (type_, addr, hit, self.sent)
        return hit[0]

    def offer(self, prefill_msg: dict, addr=P) -> dict:
        f = prefill_msg
        off = {"transport": "jax", "addr": "127.0.0.1:9000", "uuid": f["uuid"], "arrays": [], "n_pages": 3,
               "length": len(f["prompt"]), "first_token": 42, "checksums": [1, 2, 3], "prefill_s": 0.01,
               "queued_s": 0.001, "draft": 0, "draft_q": None, "lease_s": 30.0, "worker": addr,
               "skip": f.get("skip", 0)}   # (as the worker: the pages it was told to leave out)
        self.msg(addr, "offered", rid=f["rid"], uuid=f["uuid"], offer=off)
        return off

    def tokens(self, addr, rid, toks, finished=False, reason=None, error=None) -> None:
        self.msg(addr, "tokens", rid=rid, tokens=toks, finished=finished, reason=reason, error=error)

    def assert_empty(self) -> None:
        c = self.core
        assert not c.reqs and not c.by_rid and not c.pending, (c.reqs, c.by_rid, c.pending)
        assert all(not w.inflight for w in c.workers.values()), {a: w.inflight for a, w in c.workers.items()}
        assert c.snapshot()["requests"] == {}


def remote_to_decoding(h: Harness, rid="a", prompt=LONG, p=P, d=None) -> tuple[dict, dict]:
    """submit -> prefill on `p` -> offered -> decode (on `d` if given) -> accepted -> pulled ok."""
    h.submit(rid, prompt)
    h.tick()
    _, _, pre = h.one("prefill", p)
    h.offer(pre, p)
    daddr, _, dec = h.one("decode")
    if d is not None:
        assert daddr == d
    h.msg(daddr, "accepted", rid=dec["rid"])
    h.msg(daddr, "pulled", rid=dec["rid"], uuid=pre["uuid"], ok=True, error=None, transfer_s=0.02, prefill_s=0.01)
    h.one("release", p)
    return pre, dec


def test_a_draining_worker_gets_nothing_new_and_is_let_go_only_once_its_results_are_in():
    """Drain handshake: `draining` in a heartbeat reply -> no new work there; an idle reply while the router still
    has a request on it changes nothing (its last tokens are on the way); the idle reply after them -> a leave (not
    a death, nothing migrated) and `bye`; late replies of that incarnation get `bye` again and never rejoin; a
    restarted process (new incarnation) joins."""
    h = Harness()
    h.join(**{P: "prefill", D1: "decode", D2: "decode"})
    h.health(D2, "decode", load={"waiting": 4, "queued": 0})   # D1 is the least loaded: "a" goes there
    remote_to_decoding(h, "a", d=D1)
    h.health(D1, draining=True, idle=False)
    assert h.core.snapshot()["workers"][D1]["draining"]
    remote_to_decoding(h, "b", d=D2)                            # new work avoids it although it is lighter
    h.health(D1, draining=True, idle=True)                      # (a reply racing its last tokens)
    assert h.core.workers[D1].alive and h.take("bye") == []
    h.tokens(D1, "a#0", [42], finished=True, reason="length")
    h.health(D1, draining=True, idle=True)
    assert h.take("bye") == [(D1, "bye", {})] and not h.core.workers[D1].alive
    m = h.core.metrics
    assert m["workers_left"] == 1 and m.get("worker_deaths", 0) == 0 and m.get("retries", 0) == 0, m
    h.health(D1, draining=True, idle=True)                      # not exited yet: let go again, no rejoin
    assert h.take("bye") == [(D1, "bye", {})] and not h.core.workers[D1].alive
    h.tick(10.0, alive=[P, D2])                                 # its silence afterwards is not a death
    assert h.core.metrics.get("worker_deaths", 0) == 0
    h.health(D1, incarnation="inc1")                            # restarted
    assert h.core.workers[D1].alive and not h.core.workers[D1].draining


# ---- the happy path --------------------------------------------------------------------------------------------------
def test_remote_prefill_offer_pull_release_stream_then_no_trace_left():
    h = Harness()
    h.join(**{P: "prefill", D1: "decode"})
    h.health(D2, "decode", load={"waiting": 4, "queued": 0})     # D2 reports a queue: D1 is the least loaded
    assert h.submit("a")
    assert h.core.snapshot()["requests"]["a"]["state"] == "queued"
    assert h.tick()
    addr, _, pre = h.one("prefill")
    assert addr == P and pre["rid"] == "a#0" and pre["prompt"] == LONG and pre["sampling"] == SAMPLING
    assert h.core.snapshot()["requests"]["a"]["state"] == "prefilling"

    off = h.offer(pre)
    addr, _, dec = h.one("decode")
    assert addr == D1 and dec["rid"] == "a#0" and dec["offer"] == off and dec["prompt"] == LONG
    assert dec["limit"] == SAMPLING["max_tokens"]
    assert h.core.snapshot()["requests"]["a"]["state"] == "transferring"

    h.msg(D1, "accepted", rid="a#0")
    assert h.take() == []
    h.msg(D1, "pulled", rid="a#0", uuid=pre["uuid"], ok=True, error=None, transfer_s=0.02, prefill_s=0.01)
    addr, _, rel = h.one("release")
    assert addr == P and rel == {"uuid": pre["uuid"], "consumed": True}
    assert h.core.snapshot()["requests"]["a"]["state"] == "decoding"

    h.now += 0.5
    h.tokens(D1, "a#0", [42])
    h.tokens(D1, "a#0", [43, 44])
    h.now += 0.5
    h.tokens(D1, "a#0", [45], finished=True, reason="length")
    assert [e["tokens"] for e in h.events] == [[42], [43, 44], [45]]
    assert [e["finished"] for e in h.events] == [False, False, True]
    assert h.events[-1]["reason"] == "length" and h.events[-1]["error"] is None
    assert all(c is None for c in h.clients)
    m = h.events[0]["metrics"]                         # the first token carries the metrics, so does the last
    assert m["ttft_s"] == pytest.approx(0.5) and m["queue_s"] == 0.0 and m["transfer_s"] == 0.02
    assert m["prefill_s"] == 0.01 and m["prefill_queue_s"] == 0.001 and not m["local_prefill"]
    assert h.events[-1]["metrics"]["workers"] == [P, D1] and h.events[-1]["metrics"]["attempts"] == 1
    assert "metrics" not in h.events[1]
    h.assert_empty()
    assert h.core.metrics["remote_prefills"] == 1 and h.core.metrics["transfers"] == 1
    assert h.core.metrics["finished_length"] == 1 and h.core.metrics.get("retries", 0) == 0
    # the id is free again once finished
    assert h.submit("a")


def test_early_first_token_goes_out_with_the_offer_and_its_repeat_is_dropped():
    """early_first_token: the offer's first token (and its logprobs) reaches the client when `offered` arrives —
    before the transfer — and the decode worker's repeat of it is dropped; a migration after that continues from
    prompt + that token, and its own offer's token goes out early in turn."""
    h = Harness(early_first_token=True)
    h.join(**{P: "prefill", D1: "decode", D2: "decode"})
    h.submit("a")
    h.tick()
    _, _, pre = h.one("prefill", P)
    h.now += 0.25
    h.msg(P, "offered", rid=pre["rid"], uuid=pre["uuid"], offer={
        "transport": "jax", "addr": "x:1", "uuid": pre["uuid"], "arrays": [], "n_pages": 3, "length": len(LONG),
        "first_token": 42, "checksums": [1], "prefill_s": 0.2, "queued_s": 0.0, "logprobs": [-0.5, [[42, -0.5]]],
        "lease_s": 30.0, "worker": P})
    daddr, _, dec = h.one("decode")
    assert dec["prompt"] == LONG and dec["limit"] == SAMPLING["max_tokens"]     # the decode side starts as before
    assert [e["tokens"] for e in h.events] == [[42]] and h.events[0]["logprobs"] == [[-0.5, [[42, -0.5]]]]
    assert h.events[0]["metrics"]["ttft_s"] == pytest.approx(0.25)              # before any transfer
    h.msg(daddr, "pulled", rid=dec["rid"], uuid=pre["uuid"], ok=True, error=None, transfer_s=0.02)
    h.msg(daddr, "tokens", rid=dec["rid"], tokens=[42, 43], finished=False, reason=None, error=None,
          logprobs=[[-0.5, []], [-1.5, []]])
    assert [e["tokens"] for e in h.events] == [[42], [43]] and h.events[1]["logprobs"] == [[-1.5, []]]
    # the decode worker goes silent: migration, the next attempt continues after 42, 43
    h.tick(h.core.cfg.dead_after_s + 0.1, alive=(P, D1 if daddr == D2 else D2))
    _, _, pre2 = h.one("prefill", P)
    assert pre2["prompt"] == LONG + [42, 43]
    h.msg(P, "offered", rid=pre2["rid"], uuid=pre2["uuid"], offer={
        "transport": "jax", "addr": "x:1", "uuid": pre2["uuid"], "arrays": [], "n_pages": 3,
        "length": len(LONG) + 2, "first_token": 44, "checksums": [1], "lease_s": 30.0, "worker": P})
    d2, _, dec2 = h.one("decode")
    assert dec2["prompt"] == LONG + [42, 43] and dec2["limit"] == SAMPLING["max_tokens"] - 2
    h.msg(d2, "tokens", rid=dec2["rid"], tokens=[44, 45], finished=True, reason="length", error=None)
    assert [e["tokens"] for e in h.events] == [[42], [43], [44], [45]] and h.events[-1]["finished"]
    h.take("release")
    h.assert_empty()


def test_least_loaded_prefill_and_decode_workers_are_chosen():
    h = Harness(workers=(P, P2, D1, D2))
    h.join(**{P: "prefill", P2: "prefill", D1: "decode", D2: "decode"})
    h.submit("a")
    h.submit("b")
    h.tick()
    assert [(s[0], s[2]["rid"]) for s in h.take("prefill")] == [(P, "a#0"), (P2, "b#0")]
    h.submit("c", SHORT)                      # D1 and D2 tie (nothing assigned): lowest address
    h.tick()
    h.take("prefill")
    h.health(D1, load={"waiting": 3, "queued": 0})   # now D1 reports a queue: D2 gets the next decode
    h.submit("d", SHORT)
    h.core.cfg.local_prefill_threshold = 8
    h.tick()
    assert [s[0] for s in h.take("decode")] == [D2]


# ---- KV-aware routing ------------------------------------------------------------------------------------------------
def _blocks(prompt):
    from serving.prefix_cache import block_hashes
    return block_hashes(prompt, ENGINE["page_size"], (len(prompt) - 1) // ENGINE["page_size"])


def test_repeated_prefix_goes_to_the_prefill_worker_that_cached_it_unless_it_is_much_busier():
    h = Harness(workers=(P, P2, D1))
    h.join(**{P: "prefill", P2: "prefill", D1: "decode"})
    system = list(range(40, 72))                          # 4 blocks of 8
    # P2 reports (with its offer or a heartbeat) that it cached the system prompt's blocks
    h.msg(P2, "health_ok", role="prefill", worker=P2, incarnation="inc0", ready=True, engine=ENGINE,
          load={"queued": 0}, kv_events={"stored": _blocks(system + [1]), "removed": []})
    h.submit("q1", system + [5, 6, 7])
    h.tick()
    assert h.one("prefill")[0] == P2                      # P and P2 are equally idle; P2 computes 0 of 4 blocks
    h.submit("q2", system + [9])                          # P2: 1 block to compute + 5 in flight = 6; P: 5 + 0
    h.submit("other", list(range(100, 124)))              # no overlap anywhere: the least loaded (P)
    h.tick()
    assert [(a, f["rid"]) for a, _, f in h.take("prefill")] == [(P, "q2#0"), (P, "other#0")]
    assert h.core.metrics["kv_routed_requests"] == 1 and h.core.metrics["kv_routed_blocks"] == 4
    # another tenant (cache_salt) with the same system prompt: P2's blocks are not its blocks
    h.submit("t", system + [9], dict(SAMPLING, cache_salt="tenant-b"))
    h.tick()
    assert h.core.metrics["kv_routed_requests"] == 1 and len(h.take("prefill")) == 1   # no blocks it could reuse
    # P2 evicts the blocks: routing forgets them
    h.msg(P2, "health_ok", role="prefill", worker=P2, incarnation="inc0", ready=True, engine=ENGINE,
          load={"queued": 0}, kv_events={"stored": [], "removed": _blocks(system + [1])})
    assert not h.core.kv_index


def test_kv_index_forgets_a_dead_or_restarted_worker_and_cached_tokens_count_for_local_prefill():
    h = Harness(workers=(P, D1), local_prefill_threshold=4)
    h.join(**{P: "prefill", D1: "decode"})
    prompt = list(range(40, 61))                          # 21 tokens: 2 usable blocks of 8
    h.msg(D1, "health_ok", role="decode", worker=D1, incarnation="inc0", ready=True, engine=ENGINE,
          load={"queued": 0}, kv_events={"stored": _blocks(prompt), "removed": []})
    h.submit("a", prompt)                                 # 21 - 16 cached = 5 > 4: still remote
    h.submit("b", prompt[:20])                            # 20 - 16 = 4 <= 4: local on the decode worker
    h.tick()
    assert h.one("prefill")[2]["rid"] == "a#0"
    assert h.one("decode", D1)[2]["rid"] == "b#0"
    h.health(D1, incarnation="inc1")                      # restarted: its cache is gone
    assert not h.core.kv_index


def test_a_decode_worker_caching_the_prompts_blocks_gets_it_and_only_the_pages_after_them_are_offered():
    h = Harness(workers=(P, D1, D2))
    h.join(**{P: "prefill", D1: "decode", D2: "decode"})
    history = list(range(40, 72))                         # turn 1 + its answer: 4 blocks of 8, cached on D2
    h.msg(D2, "tokens", rid="old", tokens=[], finished=True, reason="stop", error=None,
          kv_events={"stored": _blocks(history + [1]), "removed": []})   # (a finished stream reports its blocks)
    h.submit("turn2", history + [5, 6, 7, 8, 9])
    h.tick()
    _, _, pre = h.one("prefill", P)
    assert pre["skip"] == 4
    h.offer(pre)
    assert h.one("decode")[0] == D2                       # D1 is as idle (and first by address): D2 holds the pages
    assert h.core.metrics["kv_pages_not_sent"] == 4
    h.submit("fresh", list(range(100, 124)))              # nothing cached anywhere: as before, nothing skipped
    h.tick()
    _, _, pre = h.one("prefill", P)
    assert "skip" not in pre
    h.offer(pre)
    assert h.one("decode")[0] == D1                       # least loaded when offered (D2 decodes turn2)
    # the holder goes away between the prefill and the offer: offered again with every page, no attempt lost
    h.submit("turn2b", history + [3, 3, 3, 3, 3])
    h.tick()
    _, _, pre = h.one("prefill", P)
    assert pre["skip"] == 4
    h.msg(D2, "health_ok", role="decode", worker=D2, incarnation="inc0", ready=True, engine=ENGINE,
          load={"queued": 0}, draining=True)
    h.offer(pre)
    assert h.one("abort", P)[2]["rid"] == "turn2b#0"      # its lease ends
    h.tick()
    _, _, pre = h.one("prefill", P)
    assert pre["rid"] == "turn2b#1" and "skip" not in pre
    assert not h.core.reqs["turn2b"].failures
    # turned off: no page is left out
    h = Harness(workers=(P, D1), kv_skip_cached=False)
    h.join(**{P: "prefill", D1: "decode"})
    h.msg(D1, "tokens", rid="old", tokens=[], finished=True, reason="stop", error=None,
          kv_events={"stored": _blocks(history + [1]), "removed": []})
    h.submit("turn2", history + [5, 6, 7, 8, 9])
    h.tick()
    assert "skip" not in h.one("prefill", P)[2]


# ---- conditional disaggregation ----------------------------------------------------------------------------------------
def test_parts_offered_during_prefill_are_pulled_ahead_by_the_decode_worker_that_gets_the_offer():
    """KV streamed during prefill: each `part` the prefill worker reports while the prompt runs becomes a `prepull`
    to one decode worker, and the offer goes to that worker although another became less loaded meanwhile; a
    failed attempt tells it to drop what it pulled ahead, and a stale part is not forwarded; with kv_stream off the
    prefill worker is not asked to stream and a part goes nowhere."""
    h = Harness()
    h.join(**{P: "prefill", D1: "decode", D2: "decode"})
    h.health(D2, "decode", load={"waiting": 4, "queued": 0})   # D1 is the least loaded
    h.submit("a")
    h.tick()
    _, _, pre = h.one("prefill", P)
    assert pre["stream"] is True
    part = {"uuid": pre["uuid"] | 1 << 57, "start": 0, "end": 2, "arrays": [], "checksums": [1, 2],
            "addr": "127.0.0.1:9000"}
    h.msg(P, "part", rid=pre["rid"], uuid=pre["uuid"], part=part)
    assert h.one("prepull", D1)[2] == {"rid": "a#0", "part": part}
    h.health(D1, load={"waiting": 8, "queued": 0})
    h.health(D2, load={"waiting": 0, "queued": 0})             # D2 is now the lighter one
    part2 = {**part, "uuid": pre["uuid"] | 2 << 57, "start": 2, "end": 4}
    h.msg(P, "part", rid=pre["rid"], uuid=pre["uuid"], part=part2)
    assert h.one("prepull", D1)[2]["part"] == part2
    h.offer(pre)
    assert h.one("decode")[0] == D1 and h.core.metrics["kv_parts_streamed"] == 2
    # a failed attempt: the worker that pulled ahead drops it; a part of that attempt arriving late goes nowhere
    h.submit("b")
    h.tick()
    _, _, pre_b = h.one("prefill", P)
    h.msg(P, "part", rid=pre_b["rid"], uuid=pre_b["uuid"], part={**part, "uuid": pre_b["uuid"] | 1 << 57})
    (sw, _, _), = h.take("prepull")
    h.msg(P, "error", rid=pre_b["rid"], error="prefill failed: boom", kind="prefill")
    assert (sw, "abort", {"rid": "b#0"}) in h.take("abort")
    h.msg(P, "part", rid=pre_b["rid"], uuid=pre_b["uuid"], part={**part, "uuid": pre_b["uuid"] | 2 << 57})
    assert h.take("prepull") == []
    # off
    h2 = Harness(kv_stream=False)
    h2.join(**{P: "prefill", D1: "decode"})
    h2.submit("c")
    h2.tick()
    _, _, pre_c = h2.one("prefill", P)
    assert "stream" not in pre_c
    h2.msg(P, "part", rid=pre_c["rid"], uuid=pre_c["uuid"], part={**part, "uuid": pre_c["uuid"] | 1 << 57})
    assert h2.take("prepull") == []


def test_short_prompt_prefills_locally_on_the_decode_worker():
    h = Harness(local_prefill_threshold=4)
    h.join(**{P: "prefill", D1: "decode"})
    h.submit("short", SHORT)
    h.submit("long", LONG)
    h.tick()
    addr, _, dec = h.one("decode")
    assert addr == D1 and dec["rid"] == "short#0" and dec["prompt"] == SHORT and "offer" not in dec
    assert h.one("prefill")[2]["rid"] == "long#0"
    assert h.core.snapshot()["requests"]["short"]["state"] == "decoding"
    h.tokens(D1, "short#0", [9, 9], finished=True, reason="stop")
    assert h.events[-1]["finished"] and h.events[-1]["reason"] == "stop"
    assert h.events[-1]["metrics"]["local_prefill"]
    assert h.core.metrics["local_prefills"] == 1 and h.core.metrics["remote_prefills"] == 1


def test_saturated_prefill_pool_goes_straight_to_the_decode_worker():
    h = Harness(max_prefill_inflight=1)
    h.join(**{P: "prefill", D1: "decode"})
    h.submit("a")
    h.submit("b")
    h.tick()
    assert h.one("prefill", P)[2]["rid"] == "a#0"
    addr, _, dec = h.one("decode")
    assert addr == D1 and dec["rid"] == "b#0" and "offer" not in dec and dec["prompt"] == LONG
    assert h.core.metrics["local_prefills"] == 1 and h.core.metrics["remote_prefills"] == 1


def test_no_live_prefill_worker_means_local_prefill():
    h = Harness()
    h.join(**{D1: "decode"})                 # P never answered
    h.submit("a")
    h.tick()
    assert h.one("decode", D1)[2]["rid"] == "a#0" and not h.take("prefill")


# ---- failures and migration ------------------------------------------------------------------------------------------
def test_checksum_pull_failure_migrates_then_gives_up_after_max_retries():
    h = Harness(max_retries=2)
    h.join(**{P: "prefill", D1: "decode"})
    h.submit("a")
    for attempt in range(3):
        h.tick()
        _, _, pre = h.one("prefill", P)
        assert pre["rid"] == f"a#{attempt}" and pre["prompt"] == LONG     # prompt + no tokens yet
        h.offer(pre)
        _, _, dec = h.one("decode", D1)
        h.msg(D1, "accepted", rid=dec["rid"])
        h.msg(D1, "pulled", rid=dec["rid"], uuid=pre["uuid"], ok=False,
              error="ChecksumError: KV checksum mismatch on page(s) [1]", transfer_s=0.01, prefill_s=0.01)
        # the abandoned attempt's workers drop it: the lease (abort to P) and the decode slot (abort to D1)
        assert h.one("abort", P)[2] == {"rid": f"a#{attempt}"}
        assert h.one("abort", D1)[2] == {"rid": f"a#{attempt}"}
        assert not h.take("release")
        if attempt < 2:
            assert not h.events and h.core.snapshot()["requests"]["a"]["attempt"] == attempt + 1
    (ev,) = h.events
    assert ev["finished"] and ev["reason"] == "error" and ev["tokens"] == []
    assert "checksum mismatch" in ev["error"] and "gave up after 3 attempts" in ev["error"]
    assert h.core.metrics["checksum_failures"] == 3 and h.core.metrics["retries"] == 3
    assert h.core.metrics["finished_error"] == 1
    h.assert_empty()
    h.tick()
    assert not h.take()                       # nothing left to dispatch


def test_decode_error_mid_stream_migrates_with_the_generated_tokens():
    h = Harness()
    h.join(**{P: "prefill", D1: "decode"})
    remote_to_decoding(h)
    h.tokens(D1, "a#0", [42, 43])
    h.tokens(D1, "a#0", [44], finished=True, reason="error", error="decode step failed")
    assert [e["tokens"] for e in h.events] == [[42, 43], [44]] and not any(e["finished"] for e in h.events)
    assert not h.take("abort", D1)           # the decode worker already dropped it
    h.tick()
    _, _, pre = h.one("prefill", P)
    assert pre["rid"] == "a#1" and pre["prompt"] == LONG + [42, 43, 44]
    h.offer(pre)
    _, _, dec = h.one("decode", D1)
    assert dec["prompt"] == LONG + [42, 43, 44] and dec["limit"] == SAMPLING["max_tokens"] - 3


def test_step_timeout_without_a_pull_retries_and_tells_the_prefill_worker_to_drop_it():
    h = Harness(step_timeout_s=2.0, dead_after_s=10.0)
    h.join(**{P: "prefill", D1: "decode"})
    h.submit("a")
    h.tick()
    _, _, pre = h.one("prefill", P)
    h.offer(pre)
    h.one("decode", D1)
    h.msg(D1, "accepted", rid="a#0")
    assert not h.tick(1.9, alive=(P, D1)) and not h.take()      # within the step deadline
    assert h.tick(0.2, alive=(P, D1))                           # offered, never pulled: the lease is abandoned
    assert h.one("abort", P)[2] == {"rid": "a#0"}
    assert h.one("abort", D1)[2] == {"rid": "a#0"}
    _, _, pre1 = h.one("prefill", P)                             # re-dispatched in the same tick
    assert pre1["rid"] == "a#1" and pre1["uuid"] != pre["uuid"]
    assert "transferring step timed out" in h.core.reqs["a"].failures[0]
    # a prefill that never answers times out the same way
    assert h.tick(2.1, alive=(P, D1))
    assert h.one("abort", P)[2] == {"rid": "a#1"} and not h.take("abort", D1)
    assert "prefilling step timed out" in h.core.reqs["a"].failures[1]
    assert h.one("prefill", P)[2]["rid"] == "a#2"


def test_dead_decode_worker_is_reconnected_and_its_requests_continue_on_another():
    h = Harness(dead_after_s=3.0)
    h.join(**{P: "prefill", D1: "decode"})
    h.health(D2, "decode", load={"waiting": 2, "queued": 0})    # D1 gets the request
    pre, dec = remote_to_decoding(h, d=D1)
    h.tokens(D1, "a#0", [42, 43])
    h.tokens(D1, "a#0", [44])
    assert not h.tick(2.9, alive=(P, D2)) and not h.reconnects
    assert h.tick(0.2, alive=(P, D2))                  # D1 silent for 3.1 s: dead
    assert h.reconnects == [D1] and not h.core.workers[D1].alive
    assert h.core.metrics["worker_deaths"] == 1
    _, _, pre1 = h.one("prefill", P)                    # migrated: re-prefilled with prompt + streamed tokens
    assert pre1["rid"] == "a#1" and pre1["prompt"] == LONG + [42, 43, 44]
    h.tokens(D1, "a#0", [45])                           # the dead worker's late tokens are not passed on
    assert h.one("abort", D1)[2] == {"rid": "a#0"}
    h.offer(pre1)
    addr, _, dec1 = h.one("decode")
    assert addr == D2 and dec1["prompt"] == LONG + [42, 43, 44] and dec1["limit"] == SAMPLING["max_tokens"] - 3
    h.msg(D2, "pulled", rid="a#1", uuid=pre1["uuid"], ok=True, error=None, transfer_s=0.02, prefill_s=0.01)
    h.one("release", P)
    h.tokens(D2, "a#1", [45, 46, 47])
    h.tokens(D2, "a#1", [48], finished=True, reason="length")
    streamed = [t for e in h.events for t in e["tokens"]]
    assert streamed == [42, 43, 44, 45, 46, 47, 48]     # no token twice
    assert h.events[-1]["finished"] and h.events[-1]["reason"] == "length"
    assert h.events[-1]["metrics"]["workers"] == [P, D1, P, D2] and h.events[-1]["metrics"]["attempts"] == 2
    h.assert_empty()


def test_worker_restart_with_a_new_incarnation_rejoins():
    h = Harness(dead_after_s=3.0)
    h.join(**{P: "prefill", D1: "decode"})
    h.submit("a")
    h.tick()
    assert h.one("prefill", P)[2]["rid"] == "a#0"
    h.health(P, incarnation="inc1")                     # same address, new process: the old one's work is lost
    w = h.core.workers[P]
    assert w.alive and w.incarnation == "inc1" and w.joins == 2 and h.reconnects == [P]
    assert h.core.metrics["worker_deaths"] == 1 and "restarted" in h.core.reqs["a"].failures[0]
    h.tick()
    assert h.one("prefill", P)[2]["rid"] == "a#1"        # and it takes the retried request
    # a worker declared dead by silence rejoins on its next heartbeat reply (restarted process)
    h.tick(3.5, alive=(P,))
    assert not h.core.workers[D1].alive and h.reconnects == [P, D1]
    h.health(D1, incarnation="inc2")
    assert h.core.workers[D1].alive and h.core.workers[D1].joins == 2
    h.submit("b", SHORT)
    h.core.cfg.local_prefill_threshold = 8
    h.tick()
    assert h.one("decode", D1)[2]["rid"] == "b#0"


def test_stale_messages_of_an_abandoned_attempt_get_abort_or_release():
    h = Harness()
    h.join(**{P: "prefill", D1: "decode"})
    h.submit("a")
    h.tick()
    _, _, pre = h.one("prefill", P)
    h.msg(P, "error", rid="a#0", error="prefill failed: boom", kind="prefill")   # attempt 0 abandoned
    h.take("abort")
    h.tick()
    _, _, pre1 = h.one("prefill", P)
    assert pre1["rid"] == "a#1"
    h.offer(pre)                                          # attempt 0's offer turns up after all
    assert h.one("release", P)[2] == {"uuid": pre["uuid"], "consumed": False}
    h.msg(D1, "accepted", rid="a#0")
    assert h.one("abort", D1)[2] == {"rid": "a#0"}
    h.msg(D1, "pulled", rid="a#0", uuid=pre["uuid"], ok=True, error=None, transfer_s=0.0, prefill_s=0.0)
    assert h.one("abort", D1)[2] == {"rid": "a#0"}
    h.tokens(D1, "a#0", [1, 2])
    assert h.one("abort", D1)[2] == {"rid": "a#0"}
    h.tokens(D1, "a#0", [3], finished=True, reason="stop")   # already ended there: nothing to answer
    h.msg(D1, "error", rid="a#0", error="late", kind="internal")
    h.msg(P, "released", uuid=pre["uuid"])
    assert not h.take() and not h.events
    assert h.core.metrics["worker_errors"] == 1
    assert h.core.reqs["a"].state == "prefilling" and h.core.reqs["a"].rid == "a#1"   # the live attempt is intact
    # a second offer for the live attempt's state (prefilling) is current; one for a finished request is stale
    h.offer(pre1)
    h.one("decode", D1)
    h.offer(pre1)
    assert h.one("release", P)[2] == {"uuid": pre1["uuid"], "consumed": False}


def test_client_abort_ends_the_request_and_tells_its_workers():
    h = Harness()
    h.join(**{P: "prefill", D1: "decode"})
    h.submit("a", client=b"client-1")
    h.tick()
    _, _, pre = h.one("prefill", P)
    h.offer(pre)
    h.one("decode", D1)                                 # transferring: both workers hold something
    assert not h.core.abort("a", h.now, client=b"someone-else")   # only its own client may cancel it
    assert not h.take() and not h.events
    assert h.core.abort("a", h.now, client=b"client-1")
    assert h.one("abort", P)[2] == {"rid": "a#0"} and h.one("abort", D1)[2] == {"rid": "a#0"}
    (ev,) = h.events
    assert ev["finished"] and ev["reason"] == "abort" and ev["rid"] == "a" and h.clients == [b"client-1"]
    h.assert_empty()
    assert not h.core.abort("a", h.now)                 # gone
    # decoding (in process): only the decode worker holds it
    remote_to_decoding(h, "b")
    h.tokens(D1, "b#0", [5])
    assert h.core.abort("b", h.now)
    assert h.one("abort", D1)[2] == {"rid": "b#0"} and not h.take("abort", P)
    assert h.events[-1]["reason"] == "abort" and h.core.metrics["finished_abort"] == 2
    h.assert_empty()


def test_abort_of_a_queued_request_removes_it_from_the_queue():
    h = Harness()
    h.submit("a")                                       # no worker has joined: it waits
    h.tick()
    assert list(h.core.pending) == ["a"]
    assert h.core.abort("a", h.now)
    assert h.events[-1]["reason"] == "abort" and not h.take()
    h.assert_empty()


def test_no_decode_worker_within_unavailable_timeout_is_an_error():
    h = Harness(unavailable_timeout_s=5.0, dead_after_s=100.0)
    h.join(**{P: "prefill"})
    h.submit("a")
    assert not h.tick(4.9) and not h.events and not h.take()
    assert h.tick(0.2)
    (ev,) = h.events
    assert ev["finished"] and ev["reason"] == "error"
    assert "no decode worker available within 5s" in ev["error"]
    h.assert_empty()


def test_an_unreachable_worker_costs_no_attempt_and_gets_nothing_until_heard_from():
    """A send that fails (the connection is down: a network blip, a restart) is not the request's failure: it goes
    to another worker without using a retry (found by bench.chaos: a cut connection burnt every retry in
    microseconds); the unreachable worker gets nothing new until it is heard from; with none reachable the request
    waits, bounded by unavailable_timeout_s."""
    h = Harness(max_retries=0, unavailable_timeout_s=5.0, dead_after_s=100.0)
    h.join(**{D1: "decode"})
    h.health(D2, "decode", load={"waiting": 4, "queued": 0})   # D1 is the lighter: tried first
    h.failing.add(D1)
    h.submit("a", SHORT)
    h.tick()
    h.tick()
    assert [(a, f["rid"]) for a, _, f in h.take("decode")] == [(D1, "a#0"), (D2, "a#1")]
    assert not h.events and h.core.reqs["a"].state == "decoding"   # max_retries=0, yet running
    h.submit("b", SHORT)
    h.tick()
    assert [a for a, _, _ in h.take("decode")] == [D2]            # D1 is not tried again ...
    h.failing.clear()
    h.health(D1)                                                  # ... until heard from
    h.submit("c", SHORT)
    h.tick()
    assert [a for a, _, _ in h.take("decode")] == [D1]
    h.failing.update({D1, D2})
    h.submit("d", SHORT)
    h.tick()
    h.tick()
    assert len(h.take("decode")) == 2 and not h.events            # both tried once, then it waits
    assert h.tick(5.1)
    (ev,) = h.events
    assert ev["rid"] == "d" and ev["reason"] == "error" and "no decode worker available" in ev["error"], ev


def test_duplicate_in_flight_id_is_rejected_without_touching_the_original():
    h = Harness()
    h.join(**{D1: "decode"})
    h.submit("a")
    h.tick()
    assert not h.submit("a", client=b"c2")
    (ev,) = h.events
    assert ev["rid"] == "a" and ev["reason"] == "error" and "already in flight" in ev["error"]
    assert h.clients == [b"c2"] and h.core.reqs["a"].state == "decoding"


def test_limit_is_capped_by_the_decode_workers_max_model_len():
    h = Harness()
    h.join(**{D1: "decode"})
    h.submit("a", list(range(60)), limit=100)          # max_model_len 64: 4 tokens left
    h.tick()
    assert h.one("decode", D1)[2]["limit"] == 4


# ---- a long-running router stays flat ---------------------------------------------------------------------------------
def _run_batch(h: Harness, start: int, n: int) -> None:
    for i in range(start, start + n):
        h.core.submit(f"r{i}", SHORT if i % 3 == 0 else LONG, SAMPLING, 4, None, h.now)
    h.now += 0.001
    h.core.tick(h.now)
    sent, h.sent = h.sent, []
    for addr, t, f in sent:
        if t == "prefill":
            h.offer(f, addr)
    sent, h.sent = sent + h.sent, []            # local prefills (sent by tick) and remote ones (after offered)
    for addr, t, f in sent:
        if t == "decode":
            if "offer" in f:
                h.msg(addr, "pulled", rid=f["rid"], uuid=f["offer"]["uuid"], ok=True, error=None,
                      transfer_s=0.001, prefill_s=0.001)
            h.tokens(addr, f["rid"], [7, 8])
            h.tokens(addr, f["rid"], [9, 10], finished=True, reason="length")
    h.sent.clear()
    assert len(h.events) == 2 * n and all(e["rid"] for e in h.events)
    assert sum(e["finished"] for e in h.events) == n
    h.events.clear()
    h.clients.clear()


def test_ten_thousand_requests_leave_no_trace_and_memory_flat():
    h = Harness(workers=(P, P2, D1, D2), local_prefill_threshold=4, max_prefill_inflight=64)
    h.join(**{P: "prefill", P2: "prefill", D1: "decode", D2: "decode"})
    batch = 100
    tracemalloc.start()
    try:
        for s in range(0, 1000, batch):
            _run_batch(h, s, batch)
        gc.collect()
        after_1k = tracemalloc.get_traced_memory()[0]
        for s in range(1000, 10_000, batch):
            _run_batch(h, s, batch)
        gc.collect()
        after_10k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    h.assert_empty()
    m = h.core.metrics
    assert m["submitted"] == 10_000 and m["finished_length"] == 10_000
    assert m["local_prefills"] + m["remote_prefills"] == 10_000 and m["local_prefills"] > 0
    assert m["transfers"] == m["remote_prefills"]
    # 9,000 more requests retain nothing: growth is a few KiB of allocator noise, not ~1 KiB per request
    assert after_10k - after_1k < 32 * 1024, (after_1k, after_10k)

"""The PD router: drives each request prefill -> KV transfer -> decode across worker processes, streams tokens.

    python -m serving.router --port=7000 --workers=127.0.0.1:7101,127.0.0.1:7201,127.0.0.1:7202
    llm = LLM(workers=["127.0.0.1:7101", ...])        # the same router, in-process (a `RemoteLLM`)
    llm = LLM(router="127.0.0.1:7000")                 # a client of a running router process

Per request: pick a decode worker (least loaded); if the prompt is short (`local_prefill_threshold`) or every
prefill worker is saturated or gone, the decode worker prefills it itself; else the least-loaded prefill worker
prefills and offers the KV (`offered`), the decode worker pulls it (`pulled`), the router acknowledges the offer
(`release`) and tokens stream back (`tokens`).

Failures: heartbeats (`health` every `heartbeat_s`, dead after `dead_after_s` of silence). A request whose worker
dies, whose pull fails (timeout, checksum, vanished peer) or whose step times out is *migrated*: re-prefilled
elsewhere with prompt + the tokens generated so far, then continued — up to `max_retries` times, else it ends
with finish_reason "error" and a reason naming the failure. Stale messages from an abandoned attempt are answered
with `abort`/`release`, so no worker keeps pages for it. A dead worker that answers heartbeats again (restarted:
new incarnation) rejoins and takes traffic.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import random
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from serving.protocol import ProtocolError, decode_message, encode_message, sampling_to_wire

log = logging.getLogger("serving.router")


@dataclasses.dataclass
class RouterConfig:
    local_prefill_threshold: int = 0      # prompts with <= this many tokens prefill on the decode worker
    max_prefill_inflight: int = 4         # per prefill worker; above it the pool counts as saturated
    heartbeat_s: float = 0.5
    dead_after_s: float = 3.0
    step_timeout_s: float = 30.0          # prefill / transfer step without an answer -> retry
    max_retries: int = 2
    unavailable_timeout_s: float = 30.0   # a request waits this long for any decode worker
    token: str | None = None


@dataclasses.dataclass
class WorkerState:
    addr: str
    sock: object = None
    role: str | None = None
    alive: bool = False
    incarnation: str | None = None
    last_seen: float = 0.0
    last_ping: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)
    inflight: set = dataclasses.field(default_factory=set)   # attempt rids assigned here
    joins: int = 0


@dataclasses.dataclass
class RReq:
    id: str
    prompt: list[int]
    sampling: dict
    limit: int
    client: object = None                  # frontend identity (router process) or None (in-process)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    output: list[int] = dataclasses.field(default_factory=list)
    attempt: int = 0
    state: str = "queued"                  # queued | prefilling | transferring | decoding | done
    rid: str = ""                          # current attempt id
    prefill_w: str | None = None
    decode_w: str | None = None
    uuid: int | None = None
    offer: dict | None = None
    deadline: float = 0.0
    local: bool = False
    finish_reason: str | None = None
    error: str | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    # metrics (router clock)
    dispatch_t: float | None = None
    prefill_s: float | None = None
    prefill_queue_s: float | None = None   # waiting in the prefill worker's queue
    transfer_s: float | None = None
    first_token_t: float | None = None
    workers: list[str] = dataclasses.field(default_factory=list)

    def metrics(self) -> dict:
        ttft = None if self.first_token_t is None else self.first_token_t - self.arrival
        queue_s = None if self.dispatch_t is None else self.dispatch_t - self.arrival
        return {"ttft_s": ttft, "queue_s": queue_s, "prefill_queue_s": self.prefill_queue_s,
                "prefill_s": self.prefill_s, "transfer_s": self.transfer_s,
                "attempts": self.attempt + 1, "workers": list(self.workers), "local_prefill": self.local}


class Router:
    """The routing core; runs its own thread. `submit`/`abort`/`events` are thread-safe."""

    def __init__(self, workers: Sequence[str], config: RouterConfig | None = None, *, bind: str | None = None):
        import zmq

        self.cfg = config or RouterConfig()
        self.ctx = zmq.Context.instance()
        self.workers = {a: WorkerState(a) for a in workers}
        self.reqs: dict[str, RReq] = {}
        self.by_rid: dict[str, RReq] = {}
        self.pending: collections.deque[RReq] = collections.deque()
        self._cmds: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._uuid = itertools.count(random.getrandbits(40) << 16)
        self.metrics = collections.Counter()
        self.frontend = None
        if bind:
            self.frontend = self.ctx.socket(zmq.ROUTER)
            self.frontend.setsockopt(zmq.LINGER, 0)
            self.frontend.bind(f"tcp://{bind}")
        self._wake_addr = f"inproc://router-wake-{id(self)}"
        self._wake_r = self.ctx.socket(zmq.PULL)
        self._wake_r.bind(self._wake_addr)
        self._wake_w = self.ctx.socket(zmq.PUSH)
        self._wake_w.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        for w in self.workers.values():
            self._connect(w)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="router", daemon=True)
        self._thread.start()

    # ---- public, any thread ---------------------------------------------------------------------------------------
    def submit(self, rid: str, prompt: list[int], sampling: dict, limit: int | None = None) -> None:
        self._cmd(("submit", rid, list(map(int, prompt)), dict(sampling), limit, None))

    def abort(self, rid: str) -> None:
        self._cmd(("abort", rid))

    def events(self, timeout: float) -> list[dict]:
        """Token events {rid, tokens, finished, reason, error, metrics?}; waits up to `timeout` for the first."""
        out = []
        try:
            out.append(self._events.get(timeout=timeout))
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return out

    def snapshot(self, timeout: float = 5.0) -> dict:
        """Workers and requests as the router sees them (tests, stats)."""
        box: queue.Queue = queue.Queue()
        self._cmd(("snapshot", box))
        return box.get(timeout=timeout)

    def wait_until(self, pred: Callable[[dict], bool], timeout: float) -> dict:
        """Block until `pred(snapshot)` holds (re-checked on every router event), or raise TimeoutError."""
        end = time.monotonic() + timeout
        while True:
            snap = self.snapshot()
            if pred(snap):
                return snap
            if time.monotonic() > end:
                raise TimeoutError(f"router state did not reach the condition within {timeout}s: {snap}")
            with self._changed:
                self._changed.wait(timeout=min(0.2, max(0.0, end - time.monotonic())))

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=10)

    # ---- internals (router thread) --------------------------------------------------------------------------------
    def _cmd(self, c) -> None:
        self._cmds.put(c)
        self._wake()

    def _wake(self) -> None:
        import zmq

        with self._wake_lock:
            try:
                self._wake_w.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _connect(self, w: WorkerState) -> None:
        import zmq

        if w.sock is not None:
            w.sock.close(0)
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)      # never queue messages for a worker that is not connected
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        s.connect(f"tcp://{w.addr}")
        w.sock = s

    def _send(self, w: WorkerState, type_: str, **fields) -> bool:
        import zmq

        try:
            w.sock.send(encode_message(type_, self.cfg.token, **fields), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def _emit(self, r: RReq, tokens: list[int], finished: bool) -> None:
        ev = {"rid": r.id, "tokens": tokens, "finished": finished, "reason": r.finish_reason, "error": r.error}
        if finished or r.first_token_t is not None and tokens and len(r.output) == len(tokens):
            ev["metrics"] = r.metrics()
        if r.client is not None:
            import zmq

            try:
                self.frontend.send_multipart([r.client, encode_message("tokens", self.cfg.token, **ev)],
                                             zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.warning("client of %s unreachable: %s", r.id, e)
        else:
            self._events.put(ev)

    def _loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self.frontend is not None:
            poller.register(self.frontend, zmq.POLLIN)
        registered = {}
        while not self._stop.is_set():
            for w in self.workers.values():
                if registered.get(w.addr) is not w.sock:
                    if w.addr in registered and registered[w.addr] is not None:
                        try:
                            poller.unregister(registered[w.addr])
                        except KeyError:
                            pass
                    poller.register(w.sock, zmq.POLLIN)
                    registered[w.addr] = w.sock
            try:
                ready = dict(poller.poll(50))
            except zmq.ZMQError:
                continue
            changed = False
            if self._wake_r in ready:
                while True:
                    try:
                        self._wake_r.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            changed |= self._drain_cmds()
            if self.frontend is not None and self.frontend in ready:
                changed |= self._frontend_recv()
            for w in list(self.workers.values()):
                if w.sock in ready:
                    changed |= self._worker_recv(w)
            changed |= self._heartbeats()
            changed |= self._timeouts()
            changed |= self._dispatch()
            if changed:
                with self._changed:
                    self._changed.notify_all()
        for w in self.workers.values():
            w.sock.close(0)
        if self.frontend is not None:
            self.frontend.close(0)

    def _drain_cmds(self) -> bool:
        changed = False
        while True:
            try:
                c = self._cmds.get_nowait()
            except queue.Empty:
                return changed
            changed = True
            if c[0] == "submit":
                _, rid, prompt, sampling, limit, client = c
                self._add(rid, prompt, sampling, limit, client)
            elif c[0] == "abort":
                r = self.reqs.get(c[1])
                if r is not None and r.state != "done":
                    self._release_attempt(r)
                    self._finish(r, "abort", None)
            elif c[0] == "snapshot":
                c[1].put(self._snapshot())

    def _snapshot(self) -> dict:
        return {"workers": {a: {"role": w.role, "alive": w.alive, "incarnation": w.incarnation, "joins": w.joins,
                                "inflight": len(w.inflight), "info": w.info} for a, w in self.workers.items()},
                "requests": {r.id: {"state": r.state, "attempt": r.attempt, "prefill": r.prefill_w,
                                    "decode": r.decode_w, "tokens": len(r.output), "workers": list(r.workers)}
                             for r in self.reqs.values()},
                "metrics": dict(self.metrics)}

    def _engine_info(self) -> dict | None:
        for w in self.workers.values():
            if w.alive and w.info.get("engine"):
                return w.info["engine"]
        return None

    def _add(self, rid, prompt, sampling, limit, client) -> None:
        old = self.reqs.get(rid)
        if old is not None and old.state != "done":
            self._reject(rid, client, f"request id {rid!r} is already in flight")
            return
        r = RReq(rid, prompt, sampling, limit if limit is not None else int(sampling.get("max_tokens", 16)),
                 client=client)
        self.reqs[rid] = r
        r.deadline = time.monotonic() + self.cfg.unavailable_timeout_s
        self.pending.append(r)
        self.metrics["submitted"] += 1

    def _reject(self, rid, client, why) -> None:
        r = RReq(rid, [], {}, 0, client=client)
        r.finish_reason, r.error, r.state = "error", why, "done"
        self._emit(r, [], True)

    # ---- worker messages --------------------------------------------------------------------------------------------
    def _worker_recv(self, w: WorkerState) -> bool:
        import zmq

        changed = False
        for _ in range(512):
            try:
                frame = w.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            changed = True
            try:
                msg = decode_message(frame, self.cfg.token)
            except ProtocolError as e:
                self.metrics[f"rejected_{e.kind}"] += 1
                log.warning("rejected message from worker %s: %s", w.addr, e)
                continue
            self._on_worker_msg(w, msg)
        return changed

    def _on_worker_msg(self, w: WorkerState, msg: dict) -> None:
        now = time.monotonic()
        t = msg["type"]
        w.last_seen = now
        if t == "health_ok":
            if not w.alive or w.incarnation != msg["incarnation"]:
                if w.alive and w.incarnation != msg["incarnation"]:
                    self._worker_died(w, f"worker {w.addr} restarted")
                log.info("worker %s (%s) joined, incarnation %s", w.addr, msg["role"], msg["incarnation"])
                w.joins += 1
            w.alive, w.role, w.incarnation = True, msg["role"], msg["incarnation"]
            w.info = {k: msg.get(k) for k in ("pages", "load", "engine", "invariant_ok", "metrics")}
            return
        rid = msg.get("rid")
        r = self.by_rid.get(rid) if isinstance(rid, str) else None
        current = r is not None and r.rid == rid and r.state != "done"
        if t == "offered":
            if not current or r.state != "prefilling":
                self._send(w, "release", uuid=msg["uuid"], consumed=False)   # stale: free the lease now
                return
            self._on_offered(r, msg)
        elif t == "accepted":
            if not current:
                self._send(w, "abort", rid=rid)
        elif t == "pulled":
            if not current:
                self._send(w, "abort", rid=rid)
                return
            self._on_pulled(r, msg)
        elif t == "tokens":
            if not current:
                if not msg["finished"]:
                    self._send(w, "abort", rid=rid)
                return
            self._on_tokens(r, msg)
        elif t == "error":
            if current:
                self._retry(r, f"worker {w.addr}: {msg['error']}")
            else:
                self.metrics["worker_errors"] += 1
                log.warning("worker %s: %s", w.addr, msg["error"])
        elif t == "released":
            pass

    def _on_offered(self, r: RReq, msg: dict) -> None:
        offer = msg["offer"]
        r.prefill_s, r.prefill_queue_s = offer.get("prefill_s"), offer.get("queued_s")
        d = self._pick("decode", exclude_dead=True)
        if d is None:
            self._retry(r, "no decode worker alive to receive the KV")
            return
        r.state, r.decode_w, r.offer = "transferring", d.addr, offer
        r.deadline = time.monotonic() + self.cfg.step_timeout_s
        d.inflight.add(r.rid)
        r.workers.append(d.addr)
        if not self._send(d, "decode", rid=r.rid, prompt=r.prompt + r.output, sampling=r.sampling,
                          limit=r.limit - len(r.output), offer=offer):
            self._retry(r, f"decode worker {d.addr} unreachable")

    def _on_pulled(self, r: RReq, msg: dict) -> None:
        p = self.workers.get(r.prefill_w)
        if msg["ok"]:
            r.transfer_s = msg.get("transfer_s")
            r.state = "decoding"
            r.deadline = float("inf")
            if p is not None and p.alive:
                self._send(p, "release", uuid=r.uuid, consumed=True)
            if p is not None:
                p.inflight.discard(r.rid)
            self.metrics["transfers"] += 1
        else:
            err = msg.get("error") or "pull failed"
            if "checksum" in err.lower():
                self.metrics["checksum_failures"] += 1
            self._retry(r, f"KV transfer from {r.prefill_w} to {r.decode_w} failed: {err}")

    def _on_tokens(self, r: RReq, msg: dict) -> None:
        toks = [int(t) for t in msg["tokens"]]
        if toks and r.first_token_t is None:
            r.first_token_t = time.perf_counter()
        if r.state in ("prefilling", "transferring"):
            r.state = "decoding"
        r.output.extend(toks)
        if msg["finished"]:
            reason = msg.get("reason")
            if reason in ("error",):
                self.by_rid.pop(r.rid, None)
                self._retry(r, f"decode worker {r.decode_w}: {msg.get('error')}", notify_decode=False)
                if toks:
                    self._emit(r, toks, False)
                return
            self._finish(r, reason or "stop", msg.get("error"), toks)
        elif toks:
            self._emit(r, toks, False)

    # ---- scheduling -------------------------------------------------------------------------------------------------
    def _load(self, w: WorkerState) -> float:
        l = w.info.get("load") or {}
        return len(w.inflight) + 0.5 * (l.get("waiting", 0) + l.get("queued", 0))

    def _pick(self, role: str, exclude_dead: bool = True) -> WorkerState | None:
        cands = [w for w in self.workers.values() if w.role == role and (w.alive or not exclude_dead)]
        if not cands:
            return None
        return min(cands, key=lambda w: (self._load(w), w.addr))

    def _dispatch(self) -> bool:
        changed = False
        while self.pending:
            r = self.pending[0]
            if r.state == "done":
                self.pending.popleft()
                continue
            d = self._pick("decode")
            if d is None:
                if time.monotonic() > r.deadline:
                    self.pending.popleft()
                    self._finish(r, "error", "no decode worker available within "
                                 f"{self.cfg.unavailable_timeout_s:.0f}s" + self._why(r))
                    changed = True
                    continue
                break
            self.pending.popleft()
            changed = True
            info = d.info.get("engine") or {}
            prompt = r.prompt + r.output
            mml = info.get("max_model_len")
            if mml is not None:
                r.limit = min(r.limit, mml - len(r.prompt))
            if r.limit - len(r.output) <= 0:
                self._finish(r, "length", None)
                continue
            r.rid = f"{r.id}#{r.attempt}"
            self.by_rid[r.rid] = r
            if r.dispatch_t is None:
                r.dispatch_t = time.perf_counter()
            pre = [w for w in self.workers.values() if w.role == "prefill" and w.alive]
            free_pre = [w for w in pre if len(w.inflight) < self.cfg.max_prefill_inflight]
            if len(prompt) <= self.cfg.local_prefill_threshold or not free_pre:
                r.local, r.state, r.decode_w, r.prefill_w = True, "decoding", d.addr, None
                r.deadline = float("inf")
                d.inflight.add(r.rid)
                r.workers.append(d.addr)
                self.metrics["local_prefills"] += 1
                if not self._send(d, "decode", rid=r.rid, prompt=prompt, sampling=r.sampling,
                                  limit=r.limit - len(r.output)):
                    self._retry(r, f"decode worker {d.addr} unreachable")
            else:
                p = min(free_pre, key=lambda w: (len(w.inflight), w.addr))
                r.local, r.state, r.prefill_w, r.decode_w = False, "prefilling", p.addr, None
                r.uuid = next(self._uuid)
                r.deadline = time.monotonic() + self.cfg.step_timeout_s
                p.inflight.add(r.rid)
                r.workers.append(p.addr)
                self.metrics["remote_prefills"] += 1
                if not self._send(p, "prefill", rid=r.rid, prompt=prompt, sampling=r.sampling, uuid=r.uuid):
                    self._retry(r, f"prefill worker {p.addr} unreachable")
        return changed

    @staticmethod
    def _why(r: RReq) -> str:
        return f" (after: {'; '.join(r.failures)})" if r.failures else ""

    def _release_attempt(self, r: RReq, notify_decode: bool = True) -> None:
        """Tell the workers of the current attempt to drop it (lease and decode slot)."""
        p, d = self.workers.get(r.prefill_w), self.workers.get(r.decode_w)
        if p is not None:
            p.inflight.discard(r.rid)
            if p.alive and r.state in ("prefilling", "transferring"):
                self._send(p, "abort", rid=r.rid)      # ends its lease (or drops the queued job)
        if d is not None:
            d.inflight.discard(r.rid)
            if d.alive and notify_decode and r.state in ("transferring", "decoding"):
                self._send(d, "abort", rid=r.rid)
        self.by_rid.pop(r.rid, None)

    def _retry(self, r: RReq, why: str, notify_decode: bool = True) -> None:
        log.warning("request %s attempt %d failed: %s", r.id, r.attempt, why)
        self.metrics["retries"] += 1
        self._release_attempt(r, notify_decode)
        r.failures.append(why)
        r.attempt += 1
        if r.attempt > self.cfg.max_retries:
            self._finish(r, "error", f"{why}; gave up after {r.attempt} attempts")
            return
        r.state, r.prefill_w, r.decode_w, r.uuid, r.offer = "queued", None, None, None, None
        r.deadline = time.monotonic() + self.cfg.unavailable_timeout_s
        self.pending.appendleft(r)

    def _finish(self, r: RReq, reason: str, error: str | None, toks: list[int] = ()) -> None:
        for w in (self.workers.get(r.prefill_w), self.workers.get(r.decode_w)):
            if w is not None:
                w.inflight.discard(r.rid)
        self.by_rid.pop(r.rid, None)
        r.state, r.finish_reason, r.error = "done", reason, error
        self.metrics[f"finished_{reason}"] += 1
        self._emit(r, list(toks), True)

    # ---- liveness and deadlines -------------------------------------------------------------------------------------
    def _heartbeats(self) -> bool:
        now = time.monotonic()
        changed = False
        for w in self.workers.values():
            if now - w.last_ping >= self.cfg.heartbeat_s:
                w.last_ping = now
                self._send(w, "health")
            if w.alive and now - w.last_seen > self.cfg.dead_after_s:
                self._worker_died(w, f"worker {w.addr} missed heartbeats for {now - w.last_seen:.1f}s")
                changed = True
        return changed

    def _worker_died(self, w: WorkerState, why: str) -> None:
        log.warning("%s: declaring it dead, migrating %d request(s)", why, len(w.inflight))
        self.metrics["worker_deaths"] += 1
        w.alive = False
        victims = [self.by_rid[rid] for rid in list(w.inflight) if rid in self.by_rid]
        w.inflight.clear()
        for r in victims:
            if r.state == "transferring" and r.prefill_w == w.addr:
                continue   # the decode side's pull ends (data arrived, peer closed, or timeout) and reports
            self._retry(r, why)
        self._connect(w)   # drop anything queued for the old process; reconnects to a restarted one

    def _timeouts(self) -> bool:
        now = time.monotonic()
        changed = False
        for r in [r for r in self.by_rid.values() if r.state in ("prefilling", "transferring") and now > r.deadline]:
            self._retry(r, f"{r.state} step timed out after {self.cfg.step_timeout_s:.0f}s")
            changed = True
        return changed

    # ---- frontend (router process) ----------------------------------------------------------------------------------
    def _frontend_recv(self) -> bool:
        import zmq

        for _ in range(512):
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            ident = frames[0]
            try:
                if len(frames) != 2:
                    raise ProtocolError("malformed", f"expected 1 frame, got {len(frames) - 1}")
                msg = decode_message(frames[1], self.cfg.token)
                t = msg["type"]
                if t == "generate":
                    limit = msg.get("limit")
                    self._add(msg["rid"], [int(x) for x in msg["prompt"]], msg["sampling"],
                              int(limit) if isinstance(limit, int) else None, ident)
                elif t == "cancel":
                    r = self.reqs.get(msg["rid"])
                    if r is not None and r.state != "done" and r.client == ident:
                        self._release_attempt(r)
                        self._finish(r, "abort", None)
                elif t in ("stats", "health"):
                    snap = self._snapshot()
                    self.frontend.send_multipart([ident, encode_message(
                        "stats_ok", self.cfg.token, engine=self._engine_info(), workers=snap["workers"],
                        metrics=snap["metrics"])], zmq.NOBLOCK)
                else:
                    raise ProtocolError("malformed", f"{t!r} is not a router request")
            except ProtocolError as e:
                self.metrics[f"rejected_{e.kind}"] += 1
                log.warning("rejected client message: %s", e)
                try:
                    self.frontend.send_multipart([ident, encode_message("error", self.cfg.token, error=str(e),
                                                                        kind=e.kind)], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        return True


class RouterClient:
    """A running router process, behind the same submit/abort/events/snapshot calls as `Router`."""

    def __init__(self, addr: str, token: str | None = None, timeout_s: float = 10.0):
        import zmq

        self.addr, self.token = addr, token
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{addr}")
        self._pending: collections.deque = collections.deque()
        self._stats: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.info = self.stats(timeout_s)

    def _recv(self, timeout: float) -> bool:
        if not self.sock.poll(int(timeout * 1000)):
            return False
        msg = decode_message(self.sock.recv(), self.token)
        if msg["type"] == "stats_ok":
            self._stats.append(msg)
        elif msg["type"] == "tokens":
            self._pending.append({k: msg.get(k) for k in ("rid", "tokens", "finished", "reason", "error",
                                                          "metrics")})
        elif msg["type"] == "error":
            raise RuntimeError(f"router {self.addr} rejected a message: {msg['error']}")
        return True

    def stats(self, timeout_s: float = 10.0) -> dict:
        with self._lock:
            self.sock.send(encode_message("stats", self.token))
            end = time.monotonic() + timeout_s
            while not self._stats:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"router {self.addr} did not answer within {timeout_s}s")
                self._recv(left)
            return self._stats.popleft()

    def snapshot(self, timeout: float = 10.0) -> dict:
        s = self.stats(timeout)
        return {"workers": s["workers"], "metrics": s["metrics"]}

    def submit(self, rid, prompt, sampling, limit=None):
        with self._lock:
            self.sock.send(encode_message("generate", self.token, rid=rid, prompt=list(map(int, prompt)),
                                          sampling=sampling, limit=limit))

    def abort(self, rid):
        with self._lock:
            self.sock.send(encode_message("cancel", self.token, rid=rid))

    def events(self, timeout: float) -> list[dict]:
        with self._lock:
            if not self._pending:
                self._recv(timeout)
            while self._recv(0):
                pass
            out = list(self._pending)
            self._pending.clear()
            return out

    def close(self):
        self.sock.close(0)


# ---- the LLM face over a router ------------------------------------------------------------------------------------
class _RemoteScheduler:
    """What `serving.batch` uses of a Scheduler: add / has_work."""

    def __init__(self, llm: "RemoteLLM"):
        self.llm = llm

    def add(self, req) -> None:
        self.llm._add(req)

    def has_work(self) -> bool:
        return bool(self.llm._live)


class RemoteLLM:
    """`LLM.generate` semantics over worker processes: `LLM(workers=[...])` (in-process router) or
    `LLM(router="host:port")` (a running `python -m serving.router`)."""

    def __init__(self, checkpoint: str | None = None, *, workers: Sequence[str] | None = None,
                 router: str | None = None, tokenizer=None, router_config: RouterConfig | None = None,
                 token: str | None = None, ready_timeout_s: float = 120.0, **unused):
        from serving.llm import Tokenizer
        from serving.scheduler import Scheduler

        if bool(workers) == bool(router):
            raise ValueError("give exactly one of workers=[addr, ...] or router='host:port'")
        bad = sorted(k for k, v in unused.items() if v is not None)
        if bad:
            raise ValueError(f"{bad} do not apply to a remote LLM: the workers own the engines")
        token = token if token is not None else os.environ.get("TANDEM_TOKEN") or None
        if checkpoint and tokenizer is None and os.path.exists(os.path.join(checkpoint, "tokenizer.json")):
            tokenizer = Tokenizer(os.path.join(checkpoint, "tokenizer.json"))
        self.tokenizer = tokenizer
        if workers:
            cfg = router_config or RouterConfig(token=token)
            if cfg.token is None:
                cfg = dataclasses.replace(cfg, token=token)
            self.backend = Router(list(workers), cfg)
            snap = self.backend.wait_until(
                lambda s: any(w["alive"] and w["role"] == "decode" for w in s["workers"].values()),
                ready_timeout_s)
            self.engine_info = next(w["info"]["engine"] for w in snap["workers"].values()
                                    if w["alive"] and w["role"] == "decode")
            try:   # give the others a few heartbeats to answer too (a worker that is down joins when it's up)
                self.backend.wait_until(lambda s: all(w["alive"] for w in s["workers"].values()),
                                        2 * cfg.heartbeat_s + 2.0)
            except TimeoutError:
                pass
        else:
            self.backend = RouterClient(router, token)
            self.engine_info = self.backend.info.get("engine")
            if not self.engine_info:
                raise RuntimeError(f"router {router} has no live worker yet")
        self.max_model_len = int(self.engine_info["max_model_len"])
        self.vocab_size = int(self.engine_info["vocab_size"])
        self.eos_ids = tuple(self.engine_info.get("eos_ids") or ())
        self._ids = itertools.count()
        self._live: dict = {}
        self._events: list = []
        self.scheduler = _RemoteScheduler(self)
        self._detok = Scheduler.__new__(Scheduler)   # reuse its stop-rule/text bookkeeping
        self._detok.detokenize = tokenizer.decode if tokenizer else None
        self._detok.eos_ids, self._detok.running, self._detok._events = (), [], []
        self.prefill_engine = self.decode_engine = None
        self._closed_pages = None

    # ---- requests ---------------------------------------------------------------------------------------------------
    def make_request(self, prompt, params, request_id: str | None = None):
        from serving.sampling import SamplingParams
        from serving.scheduler import Request

        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer (pass checkpoint=...); use stop_token_ids")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompt given but no tokenizer: pass checkpoint=... or token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) for t in ids):
                raise ValueError("a token-id prompt must be a list of ints")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise ValueError("empty prompt: it needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        limit = min(params.max_tokens, self.max_model_len - len(ids))
        return Request(id=request_id if request_id is not None else f"r{os.getpid()}-{next(self._ids)}",
                       prompt_ids=np.asarray(ids, np.int32), params=params, seed=params.resolved_seed(),
                       limit=limit)

    def _add(self, req) -> None:
        if req.id in self._live:
            raise ValueError(f"request id {req.id!r} is already in flight")
        self._live[req.id] = req
        req.status = req.status.__class__.RUNNING
        self.backend.submit(req.id, req.prompt_ids.tolist(), sampling_to_wire(req.params, req.seed), req.limit)

    def submit(self, prompt, params=None, request_id=None):
        from serving.sampling import SamplingParams

        req = self.make_request(prompt, params or SamplingParams(), request_id)
        self._add(req)
        return req

    def abort(self, request_id: str) -> None:
        self.backend.abort(request_id)

    def step(self, timeout: float = 1.0):
        """Apply the router's token events to the requests; returns scheduler `Event`s (like `LLM.step`)."""
        from serving.scheduler import Event

        out = []
        for ev in self.backend.events(timeout):
            req = self._live.get(ev["rid"])
            if req is None:
                continue
            now = time.perf_counter()
            m = ev.get("metrics") or {}
            if m.get("queue_s") is not None:
                req.prefill_start = req.arrival + m["queue_s"] + (m.get("prefill_queue_s") or 0.0)
                req.router_metrics = m
                req.prefill_end = req.prefill_start + (m.get("prefill_s") or 0.0) + (m.get("transfer_s") or 0.0)
                req.transfer_s, req.attempts, req.workers = m.get("transfer_s"), m.get("attempts"), m.get("workers")
            self._detok._events = []
            if ev["tokens"] and req.finish_reason is None:
                self._detok._append(req, list(ev["tokens"]), now)   # stop ids / strings / limit + text
            new = self._detok._events[0] if self._detok._events else Event(req, [], "", False)
            if new.finished and not ev["finished"]:
                self.backend.abort(req.id)             # a stop string hit here: end the remote request
                req.finish_reason = "stop"
            if ev["finished"] or new.finished:
                if req.finish_reason is None or ev["reason"] == "error":
                    req.finish_reason = ev["reason"] or "stop"
                    req.error = ev.get("error")
                req.status = req.status.__class__.FINISHED
                req.finish_time = now
                self._live.pop(req.id, None)
                out.append(Event(req, new.new_token_ids, new.new_text, True))
            elif new.new_token_ids:
                out.append(new)
        return out

    def _stream(self, reqs) -> Iterator:
        pending = {r.id for r in reqs}
        while pending:
            for ev in self.step():
                yield ev
                if ev.finished:
                    pending.discard(ev.request.id)

    def _submit_all(self, prompts, sampling_params):
        from serving.sampling import SamplingParams

        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, params)]
        for r in reqs:
            self._add(r)
        return reqs

    def generate_stream(self, prompts, sampling_params=None):
        return self._stream(self._submit_all(prompts, sampling_params))

    def generate(self, prompts, sampling_params=None):
        from serving.llm import output_of

        reqs = self._submit_all(prompts, sampling_params)
        for _ in self._stream(reqs):
            pass
        return [output_of(r) for r in reqs]

    def page_stats(self) -> dict:
        """{worker: {free, used, leased, total}} of every live worker (the last view once closed)."""
        if self._closed_pages is not None:
            return self._closed_pages
        snap = self.backend.snapshot()
        return {a: w["info"]["pages"] for a, w in snap["workers"].items()
                if w.get("alive") and (w.get("info") or {}).get("pages")}

    def close(self) -> None:
        if self._closed_pages is None:
            try:
                self._closed_pages = self.page_stats()
            except Exception:  # the router may be gone: nothing to report
                self._closed_pages = {}
            self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- process entry point -------------------------------------------------------------------------------------------
def main(argv):
    del argv
    from absl import flags

    F = flags.FLAGS
    from serving.worker import read_token

    cfg = RouterConfig(local_prefill_threshold=F.local_prefill_threshold,
                       max_prefill_inflight=F.max_prefill_inflight, heartbeat_s=F.heartbeat_s,
                       dead_after_s=F.dead_after_s, step_timeout_s=F.step_timeout_s, max_retries=F.max_retries,
                       unavailable_timeout_s=F.unavailable_timeout_s, token=read_token(F.token_file))
    r = Router(F.workers, cfg, bind=f"{F.host}:{F.port}")
    print(f"TANDEM_ROUTER_READY {F.host}:{F.port} workers={','.join(F.workers)}", flush=True)
    try:
        while r._thread.is_alive():   # the router thread does the work; this one only keeps the process up
            r._thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        r.close()
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("host", "127.0.0.1", "address to bind the client endpoint")
    flags.DEFINE_integer("port", 7000, "client endpoint port")
    flags.DEFINE_list("workers", None, "worker control addresses host:port (prefill and decode; roles are "
                      "learned from their health replies)")
    flags.DEFINE_integer("local_prefill_threshold", 0, "prompts with at most this many tokens prefill on the "
                         "decode worker (conditional disaggregation)")
    flags.DEFINE_integer("max_prefill_inflight", 4, "requests in flight per prefill worker before the prefill "
                         "pool counts as saturated (then decode workers prefill locally)")
    flags.DEFINE_float("heartbeat_s", 0.5, "health ping interval")
    flags.DEFINE_float("dead_after_s", 3.0, "a worker silent this long is dead; its requests migrate")
    flags.DEFINE_float("step_timeout_s", 30.0, "prefill / transfer step timeout")
    flags.DEFINE_integer("max_retries", 2, "migrations per request before it ends with an error")
    flags.DEFINE_float("unavailable_timeout_s", 30.0, "how long a request waits for any decode worker")
    flags.DEFINE_string("token_file", None, "shared-secret token file (default: $TANDEM_TOKEN)")
    flags.mark_flag_as_required("workers")
    app.run(main)

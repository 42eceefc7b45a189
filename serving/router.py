"""The PD router process shell: `Router` runs one `RouterCore` (serving/router_core.py) on a thread, over ZeroMQ.

    python -m serving.router --port=7000 --workers=127.0.0.1:7101,127.0.0.1:7201,127.0.0.1:7202
    llm = LLM(workers=["127.0.0.1:7101", ...])        # the same router, in-process
    llm = LLM(router="127.0.0.1:7000")                 # a client of a running router process (RouterClient)

Three modules: `serving.router_core` decides everything (dispatch, conditional disaggregation, leases, migration,
retries, heartbeats, timeouts) as a pure state machine; this module owns the sockets and the thread — one DEALER
per worker (recreated when the core declares the worker dead), an optional ROUTER frontend for `RouterClient`s
(`generate` / `cancel` / `stats`) and an inproc wake-up pair — and feeds the core decoded messages and
`time.monotonic()`; `serving.router_client` is the client of a router process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

import zmq
from absl import app, flags

from serving import tracing
from serving.protocol import ProtocolError, decode_message, encode_message, read_token
from serving.router_client import RouterClient
from serving.router_core import RouterConfig, RouterCore, RReq, WorkerState

__all__ = ["Router", "RouterClient", "RouterConfig", "RouterCore", "RReq", "WorkerState", "main"]

log = logging.getLogger("serving.router")


class Router:
    """A `RouterCore` on its own thread, talking ZeroMQ. `submit`/`abort`/`events`/`snapshot` are thread-safe.

    `bind="host:port"` also serves `RouterClient`s (the router process). Every call into the core happens on the
    router thread; other threads hand it commands through a queue and wake it through an inproc socket.
    """

    def __init__(self, workers: Sequence[str], config: RouterConfig | None = None, *, bind: str | None = None):
        self.cfg = config or RouterConfig()
        self.ctx = zmq.Context.instance()
        self._socks: dict[str, zmq.Socket] = {}
        self._cmds: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self.core = RouterCore(workers, self.cfg, send=self._send, emit=self._emit, reconnect=self._connect)
        self.frontend = None
        if bind:
            self.frontend = self.ctx.socket(zmq.ROUTER)
            self.frontend.setsockopt(zmq.LINGER, 0)
            self.frontend.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
            self.frontend.bind(f"tcp://{bind}")
        self._wake_addr = f"inproc://router-wake-{id(self)}"
        self._wake_r = self.ctx.socket(zmq.PULL)
        self._wake_r.bind(self._wake_addr)
        self._wake_w = self.ctx.socket(zmq.PUSH)
        self._wake_w.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        for addr in self.core.workers:
            self._connect(addr)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="router", daemon=True)
        self._thread.start()

    # ---- public, any thread ---------------------------------------------------------------------------------------
    def submit(self, rid: str, prompt: list[int], sampling: dict, limit: int | None = None,
               trace: str | None = None) -> None:
        self._cmd(("submit", rid, list(map(int, prompt)), dict(sampling), limit, trace))

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
        """Workers, in-flight requests and counters as the router sees them (tests, stats)."""
        box: queue.Queue = queue.Queue()
        self._cmd(("snapshot", box))
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the router thread did not answer within {timeout}s "
                               f"(alive: {self._thread.is_alive()})") from None

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
        with self._wake_lock:
            if self._wake_w is not None:
                self._wake_w.close(0)
                self._wake_w = None

    # ---- the core's outputs (router thread) -----------------------------------------------------------------------
    def _connect(self, addr: str) -> None:
        """(Re)create the DEALER to worker `addr`: nothing queued for an old process reaches a new one."""
        old = self._socks.get(addr)
        if old is not None:
            old.close(0)
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)      # never queue messages for a worker that is not connected
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        s.connect(f"tcp://{addr}")
        self._socks[addr] = s

    def _send(self, addr: str, type_: str, /, **fields) -> bool:
        s = self._socks.get(addr)
        if s is None:
            return False
        if fields.get("trace"):   # a traced request: the receiver's first span starts when this left
            fields["sent_ns"] = time.time_ns()
            r = self.core.by_rid.get(fields.get("rid")) if type_ in ("prefill", "decode") else None
            if r is not None and r.dispatch_ns is None:   # its first dispatch: the frontend's `queue` span ends here
                r.dispatch_ns = fields["sent_ns"]
        try:
            s.send(encode_message(type_, self.cfg.token, **fields), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def _emit(self, ev: dict, client) -> None:
        if client is None:
            self._events.put(ev)
            return
        try:
            self.frontend.send_multipart([client, encode_message("tokens", self.cfg.token, **ev)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("client of %s unreachable: %s", ev["rid"], e)

    # ---- the loop (router thread) ---------------------------------------------------------------------------------
    def _cmd(self, c) -> None:
        self._cmds.put(c)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w is None:
                return
            try:
                self._wake_w.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self.frontend is not None:
            poller.register(self.frontend, zmq.POLLIN)
        registered: dict[str, zmq.Socket] = {}
        try:
            while not self._stop.is_set():
                for addr, s in self._socks.items():   # a socket the core had recreated replaces the old one
                    old = registered.get(addr)
                    if old is not s:
                        if old is not None:
                            try:
                                poller.unregister(old)
                            except KeyError:
                                pass
                        poller.register(s, zmq.POLLIN)
                        registered[addr] = s
                try:
                    ready = dict(poller.poll(50))
                except zmq.ZMQError:
                    continue
                if self._wake_r in ready:
                    while True:
                        try:
                            self._wake_r.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                changed = self._drain_cmds()
                if self.frontend is not None and self.frontend in ready:
                    changed |= self._frontend_recv()
                for addr in list(self._socks):
                    if self._socks[addr] in ready:
                        changed |= self._worker_recv(addr)
                changed |= self.core.tick(time.monotonic())
                if changed:
                    with self._changed:
                        self._changed.notify_all()
        finally:
            for s in self._socks.values():
                s.close(0)
            if self.frontend is not None:
                self.frontend.close(0)
            self._wake_r.close(0)

    def _drain_cmds(self) -> bool:
        changed = False
        while True:
            try:
                c = self._cmds.get_nowait()
            except queue.Empty:
                return changed
            changed = True
            if c[0] == "submit":
                _, rid, prompt, sampling, limit, trace = c
                self.core.submit(rid, prompt, sampling, limit, None, time.monotonic(), trace)
            elif c[0] == "abort":
                self.core.abort(c[1], time.monotonic())
            elif c[0] == "snapshot":
                c[1].put(self.core.snapshot())

    def _worker_recv(self, addr: str) -> bool:
        changed = False
        for _ in range(512):
            try:
                frame = self._socks[addr].recv(zmq.NOBLOCK)   # looked up each time: the core may reconnect it
            except zmq.Again:
                break
            changed = True
            try:
                msg = decode_message(frame, self.cfg.token)
            except ProtocolError as e:
                self.core.count(f"rejected_{e.kind}")
                log.warning("rejected message from worker %s: %s", addr, e)
                continue
            try:
                if "spans" in msg:   # a traced request's worker spans: exported here, else on to its client
                    r = self.core.by_rid.get(msg.get("rid"))
                    if not tracing.ingest(spans := msg.pop("spans")) and r is not None and r.client is not None:
                        r.extra.setdefault("spans", []).extend(spans)
                    if r is not None and msg["type"] in ("tokens", "offered") and "sent_ns" in msg:
                        r.extra["sent_ns"] = msg["sent_ns"]   # (the frontend's `deliver` span starts there)
                self.core.on_worker_message(addr, msg, time.monotonic())
            except Exception:  # one bad (if well-formed) message never takes the router thread down
                self.core.count("handler_errors")
                log.exception("handling %r from worker %s failed", msg.get("type"), addr)
        return changed

    # ---- frontend (router process) --------------------------------------------------------------------------------
    def _frontend_recv(self) -> bool:
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
                    self.core.submit(msg["rid"], msg["prompt"], msg["sampling"],
                                     int(limit) if isinstance(limit, int) else None, ident, time.monotonic(),
                                     msg.get("trace"))
                elif t == "cancel":
                    self.core.abort(msg["rid"], time.monotonic(), client=ident)
                elif t in ("stats", "health"):
                    snap = self.core.snapshot()
                    self.frontend.send_multipart([ident, encode_message(
                        "stats_ok", self.cfg.token, engine=self.core.engine_info(), workers=snap["workers"],
                        metrics=snap["metrics"])], zmq.NOBLOCK)
                else:
                    raise ProtocolError("malformed", f"{t!r} is not a router request")
            except ProtocolError as e:
                self.core.count(f"rejected_{e.kind}")
                log.warning("rejected client message: %s", e)
                try:
                    self.frontend.send_multipart([ident, encode_message("error", self.cfg.token, error=str(e),
                                                                        kind=e.kind)], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            except zmq.ZMQError as e:
                log.warning("client %r unreachable: %s", ident, e)
        return True


# ---- process entry point -------------------------------------------------------------------------------------------
def main(argv):
    del argv
    F = flags.FLAGS
    cfg = RouterConfig(local_prefill_threshold=F.local_prefill_threshold,
                       max_prefill_inflight=F.max_prefill_inflight, heartbeat_s=F.heartbeat_s,
                       dead_after_s=F.dead_after_s, step_timeout_s=F.step_timeout_s, max_retries=F.max_retries,
                       unavailable_timeout_s=F.unavailable_timeout_s, token=read_token(F.token_file),
                       kv_routing=F.kv_routing, kv_overlap_weight=F.kv_overlap_weight,
                       early_first_token=F.early_first_token, kv_skip_cached=F.kv_skip_cached,
                       kv_stream=F.kv_stream)
    if F.otlp_traces_endpoint:   # clients' traced requests: their workers' spans are exported from here
        tracing.configure("tandem-router", endpoint=F.otlp_traces_endpoint)
    r = Router(F.workers, cfg, bind=f"{F.host}:{F.port}")
    print(f"TANDEM_ROUTER_READY {F.host}:{F.port} workers={','.join(F.workers)}", flush=True)
    try:
        while r._thread.is_alive():   # the router thread does the work; this one only keeps the process up
            r._thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        r.close()
        tracing.shutdown()
    return 0


if __name__ == "__main__":
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
    flags.DEFINE_bool("kv_routing", True, "route by the workers' prefix-cache events (workers started with "
                      "--prefix_caching): cost = kv_overlap_weight x blocks to prefill + blocks in flight")
    flags.DEFINE_float("kv_overlap_weight", 1.0, "weight of the blocks a worker would have to prefill against its "
                       "load (higher: follow the cache more, balance less)")
    flags.DEFINE_bool("kv_skip_cached", True, "a decode worker caching a prompt's leading blocks gets the request "
                      "and the prefill worker sends only the pages after them (off: every page is sent)")
    flags.DEFINE_bool("kv_stream", True, "a long prompt's KV leaves while it prefills: the prefill worker offers each "
                      "chunk's finished pages, the decode worker pulls them before the offer (off: all after it)")
    flags.DEFINE_bool("early_first_token", True, "send the first token when the prefill worker offers it, before "
                      "the KV transfer and the first decode dispatch (off: it comes from the decode worker)")
    flags.DEFINE_string("otlp_traces_endpoint", None, "OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces): "
                        "export the worker spans of traced requests (docs/tracing.md); off by default")
    flags.mark_flag_as_required("workers")
    app.run(main)

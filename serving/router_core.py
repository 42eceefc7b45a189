"""`RouterCore`: the PD router's logic as a pure state machine (no sockets, no threads, no clock).

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

Inputs are method calls (`submit`, `abort`, `on_worker_message`, `tick`), each given the current monotonic time
`now`; outputs go through three callables given to the constructor:

    send(addr, type_, **fields) -> bool    a control message to a worker (False: it could not be sent)
    emit(event, client) -> None            a token event {rid, tokens, finished, reason, error, metrics?} for
                                           the submitter (`client`: None in process, else the frontend identity)
    reconnect(addr) -> None                a worker was declared dead: drop what is queued for it, reconnect

So the whole routing policy is unit-testable with a fake clock and recorded sends (tests/test_router_core.py) and
replayable from a log of its inputs; `serving.router.Router` is the ZeroMQ/thread shell around it. A finished
request leaves no trace in the core (only the counters in `metrics`), so a long-running router stays flat.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
from typing import Callable, Sequence

from serving.kv_routing import KVRouting

log = logging.getLogger("serving.router")

SendFn = Callable[..., bool]                 # send(addr, type_, **fields) -> bool
EmitFn = Callable[[dict, object], None]      # emit(event, client)
ReconnectFn = Callable[[str], None]          # reconnect(addr)


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
    # KV-aware routing (workers with --prefix_caching publish the blocks they cache): a prefill worker's cost is
    # kv_overlap_weight x (prompt blocks it would compute) + blocks it is already prefilling (Dynamo's KV router
    # formula); the local-prefill threshold applies to the tokens the decode worker does not hold cached.
    kv_routing: bool = True
    kv_overlap_weight: float = 1.0
    # a decode worker that holds a prompt's leading blocks (by the same cost) gets the request, and the prefill
    # worker offers only the pages after them; if it evicted them meanwhile, it prefills the request itself
    kv_skip_cached: bool = True
    # the first token goes to the client as soon as the prefill worker offers it (it sampled it), not after the KV
    # transfer and the decode worker's first dispatch; the decode worker's copy of it is then dropped here
    early_first_token: bool = True
    # KV streamed during prefill: a prefill worker offers the finished pages of a long prompt after each chunk
    # (`part`), and the decode worker that will get the request pulls them while the rest computes (`prepull`)
    kv_stream: bool = True


@dataclasses.dataclass(eq=False)
class WorkerState:
    addr: str
    role: str | None = None
    alive: bool = False
    incarnation: str | None = None
    last_seen: float = 0.0
    last_ping: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)
    inflight: dict = dataclasses.field(default_factory=dict)   # attempt rid assigned here -> its prompt blocks
    joins: int = 0
    kv_blocks: set = dataclasses.field(default_factory=set)    # block hashes it reported cached (device)
    draining: bool = False     # shutting down gracefully (SIGTERM): finishes what it has, gets nothing new
    left: str | None = None    # the incarnation that drained and was let go (its late heartbeat replies: ignored)
    reachable: bool = True     # a send to it failed (connection down): no new work until it is heard from again


@dataclasses.dataclass(eq=False)
class RReq:
    id: str
    prompt: list[int]
    sampling: dict
    limit: int
    client: object = None                  # frontend identity (router process) or None (in-process)
    arrival: float = 0.0                   # router clock (`now` at submit)
    output: list[int] = dataclasses.field(default_factory=list)
    attempt: int = 0
    unsent: int = 0                        # attempts whose first message could not be sent (not counted as failures)
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
    dispatch_ns: int | None = None         # wall clock of the first dispatch (set by the shell for traced requests)
    prefill_s: float | None = None
    prefill_queue_s: float | None = None   # waiting in the prefill worker's queue
    transfer_s: float | None = None
    first_token_t: float | None = None
    workers: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)   # fields the next event carries (logprobs)
    prompt_lps_sent: bool = False          # prompt logprobs go to the client once (a migration recomputes them)
    trace: str | None = None               # W3C traceparent, passed to every worker of every attempt (tracing)
    skip: int = 0                          # tokens of this attempt already sent from its offer (early first token)
    blocks: int = 0                        # prompt blocks of the current attempt
    skip_w: str | None = None              # decode worker holding the leading pages its prefill worker does not offer
    send_all: bool = False                 # that worker went away: offer every page from now on
    stream_w: str | None = None            # decode worker pulling this attempt's parts before its offer

    def metrics(self) -> dict:
        ttft = None if self.first_token_t is None else self.first_token_t - self.arrival
        queue_s = None if self.dispatch_t is None else self.dispatch_t - self.arrival
        return {"ttft_s": ttft, "queue_s": queue_s, "prefill_queue_s": self.prefill_queue_s,
                "prefill_s": self.prefill_s, "transfer_s": self.transfer_s,
                "attempts": self.attempt + 1, "workers": list(self.workers), "local_prefill": self.local,
                **({} if self.dispatch_ns is None else {"dispatch_ns": self.dispatch_ns})}


class RouterCore(KVRouting):
    """All routing state and decisions. Not thread-safe: one caller (the shell's thread, or a test) drives it.

    State: `workers` {addr: WorkerState}; `reqs` {request id: RReq} (in flight only); `by_rid` {attempt id: RReq}
    (the current attempt of each dispatched request); `pending` {request id: RReq} (waiting for dispatch, front
    first: retried requests go to the front); `metrics` (counters).
    """

    def __init__(self, workers: Sequence[str], config: RouterConfig | None = None, *, send: SendFn, emit: EmitFn,
                 reconnect: ReconnectFn | None = None, uuid_start: int | None = None):
        self.cfg = config or RouterConfig()
        self.workers: dict[str, WorkerState] = {a: WorkerState(a) for a in workers}
        self.reqs: dict[str, RReq] = {}
        self.by_rid: dict[str, RReq] = {}
        self.pending: collections.OrderedDict[str, RReq] = collections.OrderedDict()
        self.metrics: collections.Counter = collections.Counter()
        self._send_fn, self._emit_fn = send, emit
        self._reconnect_fn = reconnect or (lambda addr: None)
        self._uuid = itertools.count(random.getrandbits(40) << 16 if uuid_start is None else uuid_start)
        self._now = 0.0       # the clock of the call being handled
        self.kv_index: dict[int, set[str]] = {}   # block hash -> workers holding it (from their cache events)

    # ---- inputs -----------------------------------------------------------------------------------------------------
    def submit(self, rid: str, prompt: Sequence[int], sampling: dict, limit: int | None, client: object,
               now: float, trace: str | None = None) -> bool:
        """Queue a request (dispatched by the next `tick`). `limit`: max new tokens (None: sampling's max_tokens).
        A duplicate in-flight id or unusable fields end it at once with an error event; returns whether queued."""
        self._now = now
        if rid in self.reqs:
            self._reject(rid, client, f"request id {rid!r} is already in flight")
            return False
        try:
            prompt = [int(t) for t in prompt]
            limit = int(limit) if limit is not None else int(sampling.get("max_tokens", 16))
        except (TypeError, ValueError, AttributeError) as e:
            self._reject(rid, client, f"bad request: {e}")
            return False
        r = RReq(rid, prompt, dict(sampling), limit, client=client, arrival=now, trace=trace)
        r.deadline = now + self.cfg.unavailable_timeout_s
        self.reqs[rid] = r
        self.pending[rid] = r
        self.metrics["submitted"] += 1
        return True

    def abort(self, rid: str, now: float, client: object = None) -> bool:
        """End request `rid` with finish_reason "abort" and tell its workers to drop it. With `client` given (a
        frontend identity), only that client's request is aborted. Returns whether a request was aborted."""
        self._now = now
        r = self.reqs.get(rid)
        if r is None or (client is not None and r.client != client):
            return False
        self._release_attempt(r)
        self._finish(r, "abort", None)
        return True

    def on_worker_message(self, addr: str, msg: dict, now: float) -> None:
        """A decoded, validated protocol message (`serving.protocol.decode_message`) from worker `addr`."""
        self._now = now
        w = self.workers.get(addr)
        if w is None:
            self.metrics["unknown_worker_messages"] += 1
            return
        t = msg["type"]
        w.last_seen, w.reachable = now, True
        if t == "health_ok":
            if msg["incarnation"] == w.left:   # drained and let go; it has not exited yet
                self._send(w, "bye")
                return
            if not w.alive or w.incarnation != msg["incarnation"]:
                if w.alive and w.incarnation != msg["incarnation"]:
                    self._worker_died(w, f"worker {w.addr} restarted")
                log.info("worker %s (%s) joined, incarnation %s", w.addr, msg["role"], msg["incarnation"])
                w.joins += 1
                self._drop_kv(w)     # a new process: its cache starts empty
            w.alive, w.role, w.incarnation = True, msg["role"], msg["incarnation"]
            if msg.get("draining") and not w.draining:
                log.info("worker %s is draining: no new work goes there", w.addr)
            w.draining = bool(msg.get("draining"))
            w.info = {k: msg.get(k) for k in ("pages", "load", "engine", "invariant_ok", "metrics", "prefix_cache",
                                                 "experts")}
            self._on_kv_events(w, msg.get("kv_events"))
            if w.draining and msg.get("idle") and not w.inflight:   # every result it sent came before this reply
                self._worker_left(w)
            return
        if w.alive:
            self._on_kv_events(w, msg.get("kv_events"))
        rid = msg.get("rid")
        r = self.by_rid.get(rid) if isinstance(rid, str) else None
        current = r is not None and r.rid == rid and r.state != "done"
        if t == "offered":
            if not current or r.state != "prefilling":
                self._send(w, "release", uuid=msg["uuid"], consumed=False)   # stale: free the lease now
                return
            self._on_offered(r, msg)
        elif t == "part":   # (a stale one: its lease, which ends, covers it)
            if current and r.state == "prefilling" and self.cfg.kv_stream:
                self._on_part(r, msg)
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
            if msg.get("kind") == "draining":   # it refused new work: no more goes there (before its heartbeat says)
                w.draining = True
            if current:
                self._retry(r, f"worker {w.addr}: {msg['error']}")
            else:
                self.metrics["worker_errors"] += 1
                log.warning("worker %s: %s", w.addr, msg["error"])
        # "released" (and anything else) needs nothing

    def tick(self, now: float) -> bool:
        """Heartbeats and dead workers, step deadlines, dispatch of pending requests. Returns whether any request
        or worker changed state."""
        self._now = now
        changed = self._heartbeats(now)
        changed |= self._timeouts(now)
        changed |= self._dispatch(now)
        return changed

    def count(self, key: str, n: int = 1) -> None:
        """Bump a counter in `metrics` (the shell counts rejected messages here)."""
        self.metrics[key] += n

    # ---- views ------------------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Workers, in-flight requests and counters (tests, stats)."""
        return {"workers": {a: {"role": w.role, "alive": w.alive, "incarnation": w.incarnation, "joins": w.joins,
                                "inflight": len(w.inflight), "draining": w.draining, "info": w.info}
                            for a, w in self.workers.items()},
                "requests": {r.id: {"state": r.state, "attempt": r.attempt, "prefill": r.prefill_w,
                                    "decode": r.decode_w, "tokens": len(r.output), "workers": list(r.workers)}
                             for r in self.reqs.values()},
                "metrics": dict(self.metrics)}

    def engine_info(self) -> dict | None:
        """The engine description a live worker reported (page size, max_model_len, vocab, eos ids, ...)."""
        for w in self.workers.values():
            if w.alive and w.info.get("engine"):
                return w.info["engine"]
        return None

    # ---- outputs ----------------------------------------------------------------------------------------------------
    def _send(self, w: WorkerState, type_: str, **fields) -> bool:
        return bool(self._send_fn(w.addr, type_, **fields))

    def _emit(self, r: RReq, tokens: list[int], finished: bool) -> None:
        ev = {"rid": r.id, "tokens": tokens, "finished": finished, "reason": r.finish_reason, "error": r.error,
              **r.extra}
        r.extra = {}
        if finished or r.first_token_t is not None and tokens and len(r.output) == len(tokens):
            ev["metrics"] = r.metrics()
        self._emit_fn(ev, r.client)

    def _reject(self, rid, client, why) -> None:
        r = RReq(rid, [], {}, 0, client=client, arrival=self._now)
        r.finish_reason, r.error, r.state = "error", why, "done"
        self._emit(r, [], True)

    # ---- worker messages --------------------------------------------------------------------------------------------
    def _streaming_to(self, r: RReq) -> WorkerState | None:
        """The decode worker pulling `r`'s parts, if it can still take the request."""
        d = self.workers.get(r.stream_w) if r.stream_w else None
        return d if d in self._usable("decode") else None

    def _on_part(self, r: RReq, msg: dict) -> None:
        """Pages of a prompt still prefilling: the decode worker that will get the request pulls them now."""
        bound = r.stream_w or r.skip_w   # (if it went away, the offer lists the parts for whoever gets it)
        d = self.workers.get(bound) if bound else self._pick("decode")
        if d is None or d not in self._usable("decode"):
            return
        r.stream_w = d.addr
        self.metrics["kv_parts_streamed"] += 1
        self._send(d, "prepull", rid=r.rid, part=msg["part"])

    def _on_offered(self, r: RReq, msg: dict) -> None:
        offer = msg["offer"]
        r.prefill_s, r.prefill_queue_s = offer.get("prefill_s"), offer.get("queued_s")
        skip = offer.get("skip") or 0
        d = self.workers.get(r.skip_w) if skip else self._streaming_to(r) or self._pick("decode")
        if skip and d not in self._usable("decode"):   # only it holds the pages not offered: offer all, elsewhere
            r.send_all, r.unsent = True, r.unsent + 1
            self._retry(r, f"decode worker {r.skip_w} holding {skip} cached pages is gone", counted=False)
            return
        if d is None:
            self._retry(r, "no decode worker alive to receive the KV")
            return
        r.state, r.decode_w, r.offer = "transferring", d.addr, offer
        r.deadline = self._now + self.cfg.step_timeout_s
        d.inflight[r.rid] = r.blocks
        self.metrics["kv_pages_not_sent"] += skip
        r.workers.append(d.addr)
        if not self._send(d, "decode", rid=r.rid, prompt=r.prompt + r.output, sampling=r.sampling,
                          limit=r.limit - len(r.output), offer=offer, trace=r.trace):
            self._unreachable(r, d)
        elif self.cfg.early_first_token and isinstance(offer.get("first_token"), int):
            r.skip = 1   # the client gets it now; the decode worker's first event repeats it
            if offer.get("logprobs") is not None:
                r.extra["logprobs"] = [offer["logprobs"]]
            if offer.get("prompt_logprobs") is not None and not r.prompt_lps_sent:
                r.prompt_lps_sent = True
                r.extra["prompt_logprobs"] = offer["prompt_logprobs"][:len(r.prompt)]
            if r.first_token_t is None:
                r.first_token_t = self._now
            r.output.append(int(offer["first_token"]))
            self._emit(r, [int(offer["first_token"])], False)

    def _on_pulled(self, r: RReq, msg: dict) -> None:
        p = self.workers.get(r.prefill_w)
        if msg["ok"]:
            r.transfer_s = msg.get("transfer_s")
            r.state = "decoding"
            r.deadline = float("inf")
            if p is not None and p.alive:
                self._send(p, "release", uuid=r.uuid, consumed=True)
            if p is not None:
                p.inflight.pop(r.rid, None)
            self.metrics["transfers"] += 1
        else:
            err = msg.get("error") or "pull failed"
            if "checksum" in err.lower():
                self.metrics["checksum_failures"] += 1
            self._retry(r, f"KV transfer from {r.prefill_w} to {r.decode_w} failed: {err}")

    def _on_tokens(self, r: RReq, msg: dict) -> None:
        toks, lps = [int(t) for t in msg["tokens"]], msg.get("logprobs")
        if r.skip and toks:   # the first token went out with the offer: drop its repeat
            k = min(r.skip, len(toks))
            toks, lps, r.skip = toks[k:], None if lps is None else lps[k:], r.skip - k
        if toks and r.first_token_t is None:
            r.first_token_t = self._now
        if lps:   # one per token, passed through to the client
            r.extra["logprobs"] = lps
        if msg.get("prompt_logprobs") is not None and not r.prompt_lps_sent:
            r.prompt_lps_sent = True
            r.extra["prompt_logprobs"] = msg["prompt_logprobs"][:len(r.prompt)]
        if r.state in ("prefilling", "transferring"):
            r.state = "decoding"
        r.output.extend(toks)
        if msg["finished"]:
            if msg.get("reason") == "error":
                self.by_rid.pop(r.rid, None)
                if toks:   # before the retry, which may end the request (its final event comes last)
                    self._emit(r, toks, False)
                self._retry(r, f"decode worker {r.decode_w}: {msg.get('error')}", notify_decode=False)
                return
            self._finish(r, msg.get("reason") or "stop", msg.get("error"), toks)
        elif toks:
            self._emit(r, toks, False)

    # ---- scheduling -------------------------------------------------------------------------------------------------
    @staticmethod
    def _load(w: WorkerState) -> float:
        l = w.info.get("load") or {}
        return len(w.inflight) + 0.5 * (l.get("waiting", 0) + l.get("queued", 0))

    def _usable(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.role == role and w.alive and not w.draining and w.reachable]

    def _pick(self, role: str) -> WorkerState | None:
        cands = self._usable(role)
        if not cands:
            return None
        return min(cands, key=lambda w: (self._load(w), w.addr))

    def _dispatch(self, now: float) -> bool:
        changed = False
        while self.pending:
            r = next(iter(self.pending.values()))
            d = self._pick("decode")
            if d is None:
                if now > r.deadline:
                    self._finish(r, "error", "no decode worker available within "
                                 f"{self.cfg.unavailable_timeout_s:.0f}s" + self._why(r))
                    changed = True
                    continue
                break
            del self.pending[r.id]
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
                r.dispatch_t = now
            free_pre = [w for w in self._usable("prefill") if len(w.inflight) < self.cfg.max_prefill_inflight]
            hashes = self._prompt_hashes(prompt, info, r.sampling.get("cache_salt"))
            Z = int(info.get("page_size") or 16)
            r.blocks = blocks = -(-len(prompt) // Z)
            held = [w for w in self._usable("decode") if self._overlap(w, hashes)]
            if held:   # some decode worker caches part of the prompt: the same cost as for prefill workers
                d = min(held + [d], key=lambda w: self._kv_cost(w, hashes, blocks))
            hit = self._overlap(d, hashes)
            if len(prompt) - hit * Z <= self.cfg.local_prefill_threshold or not free_pre:
                r.local, r.state, r.decode_w, r.prefill_w = True, "decoding", d.addr, None
                r.deadline = float("inf")
                d.inflight[r.rid] = blocks
                r.workers.append(d.addr)
                self.metrics["local_prefills"] += 1
                if not self._send(d, "decode", rid=r.rid, prompt=prompt, sampling=r.sampling,
                                  limit=r.limit - len(r.output), trace=r.trace):
                    self._unreachable(r, d)
            else:
                p = self._pick_prefill(free_pre, hashes, blocks)
                r.local, r.state, r.prefill_w, r.decode_w = False, "prefilling", p.addr, None
                skip = hit if self.cfg.kv_skip_cached and not r.send_all else 0
                r.skip_w = d.addr if skip else None
                r.uuid = next(self._uuid)
                r.deadline = now + self.cfg.step_timeout_s
                p.inflight[r.rid] = blocks
                r.workers.append(p.addr)
                self.metrics["remote_prefills"] += 1
                if not self._send(p, "prefill", rid=r.rid, prompt=prompt, sampling=r.sampling, uuid=r.uuid,
                                  trace=r.trace, **({"skip": skip} if skip else {}),
                                  **({"stream": True} if self.cfg.kv_stream else {})):
                    self._unreachable(r, p)
        return changed

    @staticmethod
    def _why(r: RReq) -> str:
        return f" (after: {'; '.join(r.failures)})" if r.failures else ""

    def _release_attempt(self, r: RReq, notify_decode: bool = True) -> None:
        """Tell the workers of the current attempt to drop it (lease and decode slot)."""
        p, d = self.workers.get(r.prefill_w), self.workers.get(r.decode_w)
        if p is not None:
            p.inflight.pop(r.rid, None)
            if p.alive and r.state in ("prefilling", "transferring"):
                self._send(p, "abort", rid=r.rid)      # ends its lease (or drops the queued job)
        if d is not None:
            d.inflight.pop(r.rid, None)
            if d.alive and notify_decode and r.state in ("transferring", "decoding"):
                self._send(d, "abort", rid=r.rid)
        s = self.workers.get(r.stream_w) if r.stream_w and r.state == "prefilling" else None
        if s is not None and s.alive:
            self._send(s, "abort", rid=r.rid)   # drops the parts it pulled ahead
        self.by_rid.pop(r.rid, None)

    def _unreachable(self, r: RReq, w: WorkerState) -> None:
        """The first message of an attempt could not be sent (the connection to `w` is down: a network blip, a
        restart): not the request's failure — it goes back to the queue and `w` gets nothing new until heard from."""
        w.reachable = False
        self.metrics["send_failures"] += 1
        free = r.unsent < 8   # (bounded: a worker heard from whose sends keep failing cannot bounce it forever)
        r.unsent += free
        self._retry(r, f"{w.role} worker {w.addr} unreachable", counted=not free)

    def _retry(self, r: RReq, why: str, notify_decode: bool = True, counted: bool = True) -> None:
        log.warning("request %s attempt %d failed: %s", r.id, r.attempt, why)
        self.metrics["retries"] += 1
        self._release_attempt(r, notify_decode)
        if counted:
            r.failures.append(why)
        r.attempt += 1
        if r.attempt - r.unsent > self.cfg.max_retries:
            self._finish(r, "error", f"{why}; gave up after {r.attempt} attempts")
            return
        r.state, r.prefill_w, r.decode_w, r.uuid, r.offer, r.skip = "queued", None, None, None, None, 0
        r.stream_w = None
        r.deadline = self._now + self.cfg.unavailable_timeout_s
        self.pending[r.id] = r
        self.pending.move_to_end(r.id, last=False)   # retried requests go first

    def _finish(self, r: RReq, reason: str, error: str | None, toks: Sequence[int] = ()) -> None:
        """End `r`: drop it from every structure of the core, then emit its final event."""
        for w in (self.workers.get(r.prefill_w), self.workers.get(r.decode_w)):
            if w is not None:
                w.inflight.pop(r.rid, None)
        self.by_rid.pop(r.rid, None)
        self.pending.pop(r.id, None)
        if self.reqs.get(r.id) is r:
            del self.reqs[r.id]
        r.state, r.finish_reason, r.error = "done", reason, error
        self.metrics[f"finished_{reason}"] += 1
        self._emit(r, list(toks), True)

    # ---- liveness and deadlines -------------------------------------------------------------------------------------
    def _heartbeats(self, now: float) -> bool:
        changed = False
        for w in self.workers.values():
            if now - w.last_ping >= self.cfg.heartbeat_s:
                w.last_ping = now
                self._send(w, "health")
            if w.alive and now - w.last_seen > self.cfg.dead_after_s:
                self._worker_died(w, f"worker {w.addr} missed heartbeats for {now - w.last_seen:.1f}s")
                changed = True
        return changed

    def _worker_left(self, w: WorkerState) -> None:
        """A draining worker finished everything it had: it leaves (not a death; nothing to migrate)."""
        log.info("worker %s drained and leaves", w.addr)
        self.metrics["workers_left"] += 1
        w.alive, w.draining, w.left = False, False, w.incarnation
        self._drop_kv(w)
        self._send(w, "bye")

    def _worker_died(self, w: WorkerState, why: str) -> None:
        log.warning("%s: declaring it %s, migrating %d request(s)", why, "gone (it was draining)" if w.draining
                    else "dead", len(w.inflight))
        self.metrics["workers_left" if w.draining and not w.inflight else "worker_deaths"] += 1
        w.alive, w.draining = False, False
        self._drop_kv(w)
        victims = [self.by_rid[rid] for rid in w.inflight if rid in self.by_rid]
        w.inflight.clear()
        for r in victims:
            if r.state == "transferring" and r.prefill_w == w.addr:
                continue   # the decode side's pull ends (data arrived, peer closed, or timeout) and reports
            self._retry(r, why)
        self._reconnect_fn(w.addr)   # drop anything queued for the old process; reconnects to a restarted one

    def _timeouts(self, now: float) -> bool:
        changed = False
        for r in [r for r in self.by_rid.values() if r.state in ("prefilling", "transferring") and now > r.deadline]:
            self._retry(r, f"{r.state} step timed out after {self.cfg.step_timeout_s:.0f}s")
            changed = True
        return changed

"""A PD worker process: one JAX process, one Engine, a KV transfer server and a ZeroMQ control endpoint.

    python -m serving.worker --role=prefill --port=7101 --checkpoint=DIR [--devices=1 --mesh=tp=1]
    python -m serving.worker --role=decode  --port=7201 --checkpoint=DIR

prefill: `prefill` -> run the prompt, lease its pages, offer them under the router's uuid, answer `offered`; the
lease ends on `release`, expiry (`--lease_s`) or `abort`. decode: `decode` with an offer -> pull it (bounded by
`--pull_timeout_s`), verify checksums, reshard, hand it to the Scheduler; without one -> prefill locally; tokens stream
back as `tokens` (docs/pd_multiprocess.md). One thread runs the control loop and the engine; pulls run on their own
threads. Bad messages get `error`; free + used + leased == total is checked after every iteration.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import sys
import signal
import threading
import time
import uuid as uuidlib

import jax
import numpy as np
import zmq
from absl import app, flags

from serving.api import Request
from serving.kv_receive import KVReceiver
from serving.batched_prefill import PrefillJob, prefill_many
from serving import flags as serving_flags
from serving.grammar import Grammars, prefill_row
from serving.grammar import of_checkpoint as grammar_of_checkpoint
from serving.logits import event_logprobs_to_wire, logprobs_to_wire
from serving.pages import PagePool
from serving.protocol import ProtocolError, decode_message, encode_message, sampling_from_wire
from serving.config import SchedulerConfig
from serving.scheduler import Scheduler
from serving import tracing
from serving.weights_peer import WeightServer
from serving.transfer import MAX_PARTS, layout_of, make_transport, offerable, page_checksums, part_uuid

log = logging.getLogger("serving.worker")


# what each role compiles: a prefill worker never decodes; a decode worker prefills locally (no offer) and receives
ROLE_EXECUTABLES = {"prefill": frozenset({"prefill", "send"}), "decode": frozenset({"prefill", "decode", "receive"})}


@dataclasses.dataclass
class Lease:
    uuid: int
    rid: str
    pages: list[int]
    expiry: float
    ident: bytes


class Worker(KVReceiver):
    def __init__(self, role: str, engine, *, host: str = "127.0.0.1", port: int = 0, transport=None,
                 token: str | None = None, lease_s: float = 30.0, pull_timeout_s: float = 20.0,
                 verify_checksums: bool = True, eos_ids=(), fault_pull_delay_s: float = 0.0,
                 fault_step_delay_s: float = 0.0, group_info: dict | None = None, overlap_decode: bool = True):
        if role not in ("prefill", "decode"):
            raise ValueError(f"role={role!r}: expected 'prefill' or 'decode'")
        self.role, self.engine, self.token = role, engine, token
        self.lease_s, self.pull_timeout_s, self.verify = lease_s, pull_timeout_s, verify_checksums
        self.weight_server = WeightServer(self, lease_s)
        self.fault_pull_delay_s, self.fault_step_delay_s = fault_pull_delay_s, fault_step_delay_s
        self.fault_corrupt_pages = 0.0   # fault injection (bench.chaos): share of pulls whose pages arrive corrupted
        self.transport = transport or make_transport("jax", host)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        if port:
            self.sock.bind(f"tcp://{host}:{port}")
        else:
            port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{port}"
        self.incarnation = uuidlib.uuid4().hex[:12]
        self.metrics = collections.Counter()
        self.group_info = group_info   # a worker group's leader: its members (serving.group)
        self.busy_hook = self.group = None   # a group's leader: Group.busy (step watchdog); its Group (`start`)
        self.mesh_spec, self.checkpoint, self.startup_s, self.weights = "", None, 0.0, None
        self.grammars: Grammars | None = None   # structured output: built on the first request that needs it
        self.invariant_ok, self._stop = True, threading.Event()
        self.drain_deadline: float | None = None   # SIGTERM: finishing what it has, taking nothing new, until this
        self._bye, self._last_health = False, time.monotonic()   # draining: router let us go; a router last asked
        # prefill role
        self._jobs: collections.deque = collections.deque()
        self.leases: dict[int, Lease] = {}
        self._parts: dict[int, list[dict]] = {}   # uuid -> parts offered early (`_offer_part`), until its lease ends
        # decode role
        self.scheduler = (Scheduler(engine, None, eos_ids=eos_ids,
                                    config=SchedulerConfig(overlap_decode=overlap_decode))
                          if role == "decode" else None)
        # the pages of this worker's engine: its scheduler's (decode) or its own (prefill)
        self.pages = self.scheduler.pages if self.scheduler is not None else PagePool(engine)
        if self.pages.prefix_cache is not None:
            self.pages.allocator.events = []   # cache events for the router (drained into health_ok / offered)
        self._owner: dict[str, bytes] = {}
        self._prompt_lps_sent: set[str] = set()   # requests whose prompt logprobs went out (with their first tokens)
        self._pulls: dict[str, dict] = {}              # rid -> pending pull state
        self._early: dict[str, dict] = {}   # rid -> parts pulled before its offer ({"t", part uuid -> Early})
        self._pulled: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()   # a finished pull wakes the loop (it may sit in a poll)
        os.set_blocking(self._wake_r, False)

    # ---- wire -----------------------------------------------------------------------------------------------------
    def send(self, ident: bytes, type_: str, **fields) -> None:
        try:
            self.sock.send_multipart([ident, encode_message(type_, self.token, **fields)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone / HWM: the router's timeouts cover a lost message
            log.warning("send %s to %r failed: %s", type_, ident, e)

    def _recv_all(self) -> None:
        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident = frames[0]
            if len(frames) != 2:
                self.metrics["rejected_malformed"] += 1
                log.warning("rejected malformed message from %r: %d frames", ident, len(frames))
                self.send(ident, "error", error=f"malformed message: expected 1 frame, got {len(frames) - 1}",
                          kind="malformed")
                continue
            msg = None   # (an undecodable message names no request)
            try:
                msg = decode_message(frames[1], self.token)
                self._handle(ident, msg)
            except ProtocolError as e:
                self.metrics[f"rejected_{e.kind}"] += 1
                log.warning("rejected message from %r: %s", ident, e)
                self.send(ident, "error", error=str(e), kind=e.kind)
            except Exception as e:  # a handler bug on one message never takes the worker down
                self.metrics["handler_errors"] += 1
                log.exception("handling a message from %r failed", ident)
                self.send(ident, "error", error=f"{type(e).__name__}: {e}", kind="internal",
                          rid=msg.get("rid") if isinstance(msg, dict) else None)

    def count_compiles(self) -> None:
        """Count XLA compilations from now on (`compiles` in health_ok): after start-up there must be none."""
        jax.monitoring.register_event_duration_secs_listener(
            lambda name, *a, **k: self.metrics.update(compiles=1) if "backend_compile" in name else None)

    # ---- state ----------------------------------------------------------------------------------------------------
    def health(self, kv_events: bool = False) -> dict:
        load = {"queued": len(self._jobs), "leases": len(self.leases), "offers": self.transport.outstanding(),
                "drains": getattr(self.transport, "drains", 0)}
        if self.scheduler is not None:
            st = self.scheduler.stats()
            load.update(running=st["running"], waiting=st["waiting"] + st["ready"] + st["prefilling"],
                        pulling=len(self._pulls))
        ec, mc = self.engine.cfg, self.engine.model_cfg
        return dict(role=self.role, worker=self.address, incarnation=self.incarnation, ready=self.drain_deadline is None,
                    draining=self.drain_deadline is not None, idle=self.drain_deadline is not None and self.idle(),
                    pages=self.pages.stats(),
                    prefix_cache=self.pages.prefix_cache.stats() if self.pages.prefix_cache else None,
                    kv_events=self.kv_events() if kv_events else None,
                    invariant_ok=self.invariant_ok, load=load, metrics={**self.metrics, **{
                        k: v for k, v in getattr(self.scheduler, "prefill_stats", {}).items()
                        if k in ("pages_not_sent", "reprefilled")}},
                    experts=self.engine.expert_stats.summary() if self.engine.expert_stats.shape[0] else None,
                    group=None if self.group_info is None else {
                        **self.group_info, "mirror": getattr(self.engine.mirror, "stats", None),
                        **{f"member_{x}": {str(k): v for k, v in getattr(getattr(
                            self.engine.mirror, "group", None), f"member_{x}", {}).items()} for x in ("compiles", "kv")},
                        "kv_into": "members" if self.members is not None else "leader"},
                    engine={"page_size": ec.page_size, "max_model_len": ec.max_model_len,
                            "prefix_caching": ec.prefix_caching, "kv_lookahead": 1 if ec.mtp else 0,
                            "cache_shape": list(self.engine.cache_shape), "cache_dtype": str(self.engine.cache.dtype),
                            "vocab_size": mc.vocab_size, "eos_ids": list(mc.eos_token_ids),
                            "transport": self.transport.name, "transfer_addr": self.transport.address})

    def kv_events(self) -> dict | None:
        """Prefix-cache events since the last report (block hashes stored / evicted on this worker's device), for
        the router's KV-aware routing; None without prefix caching."""
        pc = self.pages.prefix_cache
        if pc is None:
            return None
        ev = self.pages.allocator.drain_events()
        if pc.block_meta is not None:   # consumers that hash tokens themselves (Dynamo): each block's parent, tokens
            ev["blocks"] = [[h, *pc.block_meta.get(h, (None, None))] for h in ev["stored"]]
        return ev

    def _make_request(self, msg: dict, limit: int | None = None):
        prompt = np.asarray(msg["prompt"], np.int32)
        ec, vocab = self.engine.cfg, self.engine.model_cfg.vocab_size
        if not 0 < len(prompt) < ec.max_model_len:
            raise ProtocolError("malformed", f"prompt of {len(prompt)} tokens (max_model_len {ec.max_model_len})")
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ProtocolError("malformed", f"prompt token ids outside the vocabulary [0, {vocab})")
        params = sampling_from_wire(msg["sampling"])
        if params.seed is None:
            raise ProtocolError("malformed", "sampling.seed must be resolved by the router")
        limit = ec.max_model_len - len(prompt) if limit is None else min(limit, ec.max_model_len - len(prompt))
        if limit < 1:
            raise ProtocolError("malformed", f"limit {limit}: nothing to generate")
        req = Request(id=msg["rid"], prompt_ids=prompt, params=params, seed=params.seed, limit=limit,
                      trace=msg.get("trace"), arrival=tracing.perf_of(msg.get("sent_ns"), time.perf_counter()))
        if params.structured_output is not None:   # this worker's own matcher (masks its steps, reads its tokens)
            try:
                req.matcher = self._grammars().matcher(params.structured_output)
            except ValueError as e:
                raise ProtocolError("malformed", str(e)) from None
        return req

    def _grammars(self) -> Grammars:
        if self.grammars is None:
            self.grammars = grammar_of_checkpoint(self.checkpoint, self.engine.model_cfg)
        return self.grammars

    # ---- dispatch -------------------------------------------------------------------------------------------------
    def _handle(self, ident: bytes, msg: dict) -> None:
        t = msg["type"]
        if t in ("health", "stats"):   # cache events go to the router's heartbeat only, not to a stats poll
            self.send(ident, "health_ok", **self.health(kv_events=t == "health"))
            self._last_health = time.monotonic() if t == "health" else self._last_health
        elif t == "bye":   # sent after the router processed everything we sent before our idle health_ok
            self._bye = self.drain_deadline is not None
        elif t == "abort":
            self._abort(msg["rid"])
        elif t in ("weights", "weights_release"):   # a starting worker takes our weights (serving.weights_peer)
            self.weight_server.handle(ident, msg)
        elif t in ("prefill", "decode") and self.drain_deadline is not None:   # sent before the router knew
            self.metrics["refused_draining"] += 1
            self.send(ident, "error", rid=msg["rid"], error="worker draining: retry elsewhere", kind="draining")
        elif self.role == "prefill" and t == "prefill":
            req = self._make_request(msg)
            skip = msg.get("skip", 0)
            if not isinstance(skip, int) or skip < 0:
                raise ProtocolError("malformed", f"skip {skip!r}: must be a count of pages >= 0")
            req.skip_pages = min(skip, self.engine.pages_needed(len(req.prompt_ids)) - 1)   # the last one always goes
            req.stream_parts = bool(msg.get("stream"))
            if any(l.uuid == msg["uuid"] for l in self.leases.values()):
                raise ProtocolError("malformed", f"uuid {msg['uuid']} is already offered")
            self._jobs.append((ident, req, msg["uuid"]))
        elif self.role == "prefill" and t == "release":
            self._end_lease(msg["uuid"], consumed=bool(msg.get("consumed", True)), why="release")
            self.send(ident, "released", uuid=msg["uuid"])
        elif self.role == "decode" and t == "decode":
            self._start_decode(ident, msg)
        elif self.role == "decode" and t == "prepull":
            self._prepull(msg["rid"], msg["part"])
        else:
            raise ProtocolError("malformed", f"{t!r} is not a request a {self.role} worker serves")

    def _abort(self, rid: str) -> None:
        self.metrics["aborts"] += 1
        if self.role == "prefill":
            self._jobs = collections.deque(j for j in self._jobs if j[1].id != rid)
            for l in [l for l in self.leases.values() if l.rid == rid]:
                self._end_lease(l.uuid, consumed=False, why="abort")
        else:
            p = self._pulls.get(rid)
            if p is not None:
                p["aborted"] = True
            self._forget_early(rid)
            self.scheduler.abort(rid)
            self._owner.pop(rid, None)

    # ---- prefill role ---------------------------------------------------------------------------------------------
    def _prefill_jobs(self) -> None:
        """The queued jobs, batched (`serving.batched_prefill`): as many as the largest row bucket and the free pages
        allow, each offered as soon as its prompt is done."""
        eng, taken = self.engine, []
        while self._jobs and len(taken) < eng.cfg.prefill_rows[-1]:
            ident, req, uuid = self._jobs[0]
            n = eng.pages_needed(len(req.prompt_ids))
            if n > self.pages.allocator.total:
                self._jobs.popleft()
                self.send(ident, "error", rid=req.id, error=f"prompt needs {n} pages; the prefill cache has "
                          f"{self.pages.allocator.total}", kind="capacity")
                continue
            got = self.pages.acquire(req.prompt_ids, n, hashes=None if req.cacheable else [], salt=req.salt)   # with prefix caching: the cached prefix shared
            if got is None:
                break  # saturated: leases must end (ack / expiry) first
            self._jobs.popleft()
            taken.append((ident, req, uuid, got[0], got[1]))
        t0, done = time.perf_counter(), set()
        jobs = [PrefillJob(req.prompt_ids, pages, prefill_row(req, self.engine.model_cfg.vocab_size), cached)
                for _, req, _, pages, cached in taken]
        progress = lambda i, done, out: self._offer_part(*taken[i][:4], done, out)   # noqa: E731
        try:
            for i, out in prefill_many(eng, jobs, self.metrics, progress):
                done.add(i)
                self._offer(*taken[i], out, t0)
        except Exception as e:
            log.exception("batched prefill of %s failed", [t[1].id for t in taken])
            for i, (ident, req, uuid, pages, _) in enumerate(taken):
                if i not in done:
                    self._drop_parts(uuid)
                    self.pages.allocator.release(pages)
                    self.send(ident, "error", rid=req.id, error=f"prefill failed: {e}", kind="prefill")

    def _offer_part(self, ident: bytes, req, uuid: int, pages: list[int], done: int, out) -> None:
        """After a chunk of a long prompt (not its last): offer the pages it finished — wholly before token `done`,
        past what the decode worker holds or was offered already — as the next part, and tell the router, which
        has the decode worker pull it while the rest of the prompt computes (KV streamed during prefill)."""
        if not req.stream_parts:
            return
        parts = self._parts.setdefault(uuid, [])
        a = parts[-1]["end"] if parts else req.skip_pages
        b = min(done // self.engine.cfg.page_size, len(pages) - 1)   # the last page always goes with the offer
        if b <= a or len(parts) >= MAX_PARTS:
            return
        try:
            arrays = [offerable(self.engine.extract(pages[a:b], len(req.prompt_ids), out).pages)]
            part = {"uuid": part_uuid(uuid, len(parts)), "start": a, "end": b, "addr": self.transport.address,
                    "arrays": [layout_of(x) for x in arrays], "checksums": page_checksums(np.asarray(arrays[0]))}
            self.transport.offer(part["uuid"], arrays)
        except Exception:   # the offer then carries these pages: streaming is an optimisation, never a failure
            log.exception("offering part %d of %s failed; its pages go with the offer", len(parts), req.id)
            req.stream_parts = False
            return
        parts.append(part)
        self.metrics["parts_offered"] += 1
        self.send(ident, "part", rid=req.id, uuid=uuid, part=part)

    def _drop_parts(self, uuid: int, consumed: bool = False) -> None:
        """End the transport offers of `uuid`'s parts: consumed with the offer (a good pull took every part), else
        drained like an abandoned offer."""
        for p in self._parts.pop(uuid, []):
            self.transport.release(p["uuid"], consumed=consumed)

    def _offer(self, ident: bytes, req, uuid: int, pages: list[int], cached: int, out, t0: float) -> None:
        eng = self.engine
        try:
            queued_s = t0 - req.arrival
            self.pages.cache_prefix(pages, np.append(req.prompt_ids, out.token), len(req.prompt_ids), req.salt)
            self.metrics["cached_tokens"] += cached
            skip = req.skip_pages   # the decode worker holds these in its prefix cache: not offered
            parts = self._parts.get(uuid, [])   # offered while the prompt ran: the offer lists them, has the rest
            prefix = eng.extract(pages[parts[-1]["end"] if parts else skip:], len(req.prompt_ids), out)
            arrays = [offerable(prefix.pages)]
            sums = page_checksums(np.asarray(arrays[0]))
            self.pages.allocator.lease(pages)
            self.transport.offer(uuid, arrays)
            prefill_s = time.perf_counter() - t0
        except Exception as e:
            self._drop_parts(uuid)
            self.pages.allocator.release(pages)
            log.exception("prefill of %s failed", req.id)
            self.send(ident, "error", rid=req.id, error=f"prefill failed: {e}", kind="prefill")
            return
        self.leases[uuid] = Lease(uuid, req.id, pages, time.monotonic() + self.lease_s, ident)
        self.metrics["offers"] += 1
        offer = {"transport": self.transport.name, "addr": self.transport.address, "uuid": uuid,
                 "arrays": [layout_of(a) for a in arrays], "n_pages": prefix.n_pages, "length": prefix.length,
                 "first_token": int(prefix.first_token), "checksums": sums, "prefill_s": prefill_s,
                 "queued_s": queued_s, "cached_tokens": cached, "skip": skip, "parts": parts,
                 "draft": int(prefix.draft), "draft_q": None if prefix.draft_q is None else
                 np.asarray(prefix.draft_q, np.float32).tobytes(), **logprobs_to_wire(prefix),
                 "lease_s": self.lease_s, "worker": self.address, "offered_ns": time.time_ns()}
        tracing.prefill_spans(req, t0, t0 + prefill_s, cached)
        self.send(ident, "offered", rid=req.id, uuid=uuid, offer=offer, kv_events=self.kv_events(),
                  **tracing.take(req.trace))

    def _end_lease(self, uuid: int, consumed: bool, why: str) -> None:
        l = self.leases.pop(uuid, None)
        if l is None:
            return
        self.transport.release(uuid, consumed=consumed)
        self._drop_parts(uuid, consumed)
        self.pages.allocator.release(l.pages)   # drops the lease and frees the pages
        self.metrics[f"leases_ended_{why}"] += 1

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for l in [l for l in self.leases.values() if l.expiry <= now]:
            log.warning("lease of offer %d (%s) expired unacknowledged: pages %s back to the free list", l.uuid,
                        l.rid, l.pages)
            self._end_lease(l.uuid, consumed=False, why="expired")

    # ---- decode role ----------------------------------------------------------------------------------------------
    def _start_decode(self, ident: bytes, msg: dict) -> None:
        req = self._make_request(msg, msg["limit"])
        rid = req.id
        if rid in self._owner:
            raise ProtocolError("malformed", f"request {rid!r} is already in flight here")
        offer = msg.get("offer")
        self._owner[rid] = ident
        if offer is None:
            self.metrics["local_prefills"] += 1
            self.scheduler.add(req)
        else:
            if not isinstance(offer, dict):
                raise ProtocolError("malformed", "'offer' must be a map")
            missing = [k for k in ("addr", "uuid", "arrays", "n_pages", "length", "first_token", "checksums")
                       if k not in offer]
            if missing:
                self._owner.pop(rid, None)
                raise ProtocolError("malformed", f"offer lacks {missing}")
            if offer.get("transport", self.transport.name) != self.transport.name:
                self._owner.pop(rid, None)
                raise ProtocolError("malformed", f"offer over {offer.get('transport')!r}; this worker speaks "
                                    f"{self.transport.name!r}")
            early = self._early.pop(rid, None)
            state = self._pulls[rid] = {"aborted": False, "owner": self._member_for(req, offer, early)}
            threading.Thread(target=self._pull, args=(req, offer, state, early), name=f"pull-{rid}",
                             daemon=True).start()
        self.send(ident, "accepted", rid=rid)

    def _drain_pulls(self) -> None:
        while True:
            try:
                req, offer, prefix, err, dt = self._pulled.get_nowait()
            except queue.Empty:
                return
            state = self._pulls.pop(req.id, {"aborted": True})
            ident = self._owner.get(req.id)
            if err is not None:
                self.metrics["pull_failures"] += 1
                if "checksum" in err:
                    self.metrics["checksum_failures"] += 1
                log.warning("pull of %s failed: %s", req.id, err)
            else:
                self.metrics["pulls"] += 1
            if state["aborted"] or ident is None:
                continue
            self.send(ident, "pulled", rid=req.id, uuid=int(offer["uuid"]), ok=err is None, error=err,
                      transfer_s=dt, prefill_s=offer.get("prefill_s"))
            if err is None:
                req.prefill_end = time.perf_counter()
                req.prefill_start, req.transfer_s = tracing.perf_of(offer.get("offered_ns"), req.arrival), dt
                self.scheduler.add_prefilled(req, prefix)
            else:
                self._owner.pop(req.id, None)

    def _decode_step(self) -> None:
        if self.fault_step_delay_s:
            time.sleep(self.fault_step_delay_s)   # fault injection (tests): a slow engine, so streams last
        for ev in self.scheduler.step():
            rid = ev.request.id
            ident = self._owner.get(rid)
            if ident is not None:
                r = ev.request
                lps = event_logprobs_to_wire(ev, self._prompt_lps_sent)
                tracing.worker_spans(r, ev.finished)
                self.send(ident, "tokens", rid=rid, tokens=[int(t) for t in ev.new_token_ids],
                          finished=ev.finished, reason=r.finish_reason if ev.finished else None, error=r.error,
                          cached_tokens=r.cached_tokens if ev.finished else None, **lps, **tracing.take(r.trace),
                          **({"kv_events": self.kv_events()} if ev.finished else {}))   # its blocks, now cached
            if ev.finished:
                self._prompt_lps_sent.discard(rid)
                self._owner.pop(rid, None)
                self.scheduler.requests.pop(rid, None)

    # ---- loop -----------------------------------------------------------------------------------------------------
    def busy(self) -> bool:
        if self.role == "prefill":
            return bool(self._jobs) and self.pages.allocator.can_allocate(
                self.engine.pages_needed(len(self._jobs[0][1].prompt_ids)))
        return self.scheduler.has_work() or not self._pulled.empty()

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            if self.drain_deadline is not None and self._drained():
                break
            ready = dict(poller.poll(0 if self.busy() else 10))
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if self.sock in ready:
                self._recv_all()
            if self.role == "prefill":
                if self._jobs:
                    self._engine_work(self._prefill_jobs)
                self._expire_leases()
            else:
                self._drain_pulls()
                for rid in [r for r, e in self._early.items() if e["t"] < time.monotonic() - self.lease_s]:
                    self._forget_early(rid)   # parts pulled for an offer that never came (its prefill failed)
                if self.scheduler.has_work():
                    self._engine_work(self._decode_step)
            try:
                self.pages.allocator.check()
            except AssertionError as e:
                if self.invariant_ok:
                    log.critical("page invariant violated (free, used, leased, total) = %s", e)
                self.invariant_ok = False

    def _engine_work(self, fn) -> None:
        if self.busy_hook is None:
            return fn()
        self.busy_hook(True)
        try:
            fn()
        finally:
            self.busy_hook(False)

    def stop(self) -> None:
        self._stop.set()

    def drain(self, timeout_s: float) -> None:
        """Graceful shutdown (SIGTERM): report `draining` (the router stops sending), refuse new work (retryable),
        finish in-flight requests and leases; `serve_forever` returns once idle and the router said `bye` (it got
        everything we sent), or no router asks for 5 s, or after `timeout_s` (the router migrates what is left)."""
        if self.drain_deadline is None:
            log.info("draining: finishing in-flight work within %.0f s", timeout_s)
            self.drain_deadline = time.monotonic() + timeout_s

    def _drained(self) -> bool:
        now, idle = time.monotonic(), self.idle()
        if now > self.drain_deadline and not idle:
            log.warning("drain timed out with work in flight: %d jobs, %d leases, %d pulls", len(self._jobs),
                        len(self.leases), len(self._pulls))
        return now > self.drain_deadline or idle and (self._bye or now - self._last_health > 5.0)

    def idle(self) -> bool:
        """Nothing in flight: no queued prefill, lease, pull or running request."""
        return not (self._jobs or self.leases or self._pulls or not self._pulled.empty()
                    or (self.scheduler is not None and self.scheduler.has_work()))

    def close(self) -> None:
        self.sock.close(0)
        w, self._wake_w = self._wake_w, -1
        os.close(self._wake_r)
        os.close(w)
        self.transport.close()
        self.pages.close()


def main(argv):
    from serving.worker_start import run, start   # (imports this module)

    del argv
    FLAGS = flags.FLAGS
    w = start(FLAGS, FLAGS.role)
    if w is None:   # a group follower: done
        return 0
    print("TANDEM_WORKER_READY " + json.dumps({"role": w.role, "control": w.address, "transfer": w.transport.address,
                                               "mesh": w.mesh_spec, "startup_s": w.startup_s,
                                               "executable_cache": w.engine.exec_cache_stats, "weights": w.weights,
                                               "group": w.group_info}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: w.drain(FLAGS.drain_timeout_s))   # graceful: see Worker.drain
    run(w)
    # sockets closed, work done: leave without interpreter teardown, where the jax transfer server's destructor
    # can abort (std::terminate) with a pull still pending (seen in bench.chaos after a drain)
    tracing.shutdown()
    logging.shutdown()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    flags.DEFINE_enum("role", None, ["prefill", "decode"], "worker role")
    serving_flags.define_worker_flags()
    app.run(main)

"""Backends behind `LLM`: the in-process scheduler or a PD router over worker processes, one small interface.

    backend.submit(req)            # a validated `serving.api.Request`
    backend.abort(request_id)
    backend.events(timeout) -> [Event]   # progress: runs one scheduler step, or waits for router messages
    backend.has_work() -> bool
    backend.page_stats() -> {engine or worker: {free, used, leased, total}}
    backend.close()

Both apply the same token rules (`serving.stops.append_tokens`: stop tokens, EOS, length): the scheduler to the
tokens its engine emits, the remote backend to the tokens the router streams. Text and stop strings are the
frontend's (`serving.stops.TextStage`, applied by `LLM`, or on the HTTP server's text thread).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Protocol, Sequence

from serving.api import Event, Request, Status
from serving.logits import TokenLogprobs, logprobs_from_wire
from serving.stops import append_tokens
from serving.protocol import sampling_to_wire
from serving.router import Router, RouterConfig
from serving.router_client import RouterClient
from serving.scheduler import Scheduler
from serving import tracing

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What `LLM` drives: the in-process scheduler (`LocalBackend`) or a router of worker processes
    (`RemoteBackend`)."""

    vocab_size: int
    max_model_len: int
    eos_ids: tuple[int, ...]

    def submit(self, req: Request) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def events(self, timeout: float = 1.0) -> list[Event]: ...

    def has_work(self) -> bool: ...

    def page_stats(self) -> dict[str, dict[str, int]]: ...

    def prefix_cache_stats(self) -> dict[str, dict]: ...

    def expert_stats(self) -> dict[str, dict]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The in-process scheduler over one or two engines on this process's devices."""

    def __init__(self, scheduler: Scheduler, *, vocab_size: int, max_model_len: int):
        self.scheduler = scheduler
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.eos_ids = scheduler.eos_ids

    def submit(self, req: Request) -> None:
        self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def events(self, timeout: float = 1.0) -> list[Event]:
        del timeout  # a step either computes or (disaggregated, nothing to decode) waits briefly for a prefix
        return self.scheduler.step()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def pools(self):
        s = self.scheduler
        return [(s.decode.name, s.pages)] + ([(s.prefill.name, s.prefill_pages)] if s.prefill is not None else [])

    def page_stats(self) -> dict[str, dict[str, int]]:
        return {name: pool.stats() for name, pool in self.pools()}

    def prefix_cache_stats(self) -> dict[str, dict]:
        """Per engine with prefix caching on: hits per tier, evictions, blocks and bytes per tier."""
        return {name: pool.prefix_cache.stats() for name, pool in self.pools() if pool.prefix_cache is not None}

    def expert_stats(self) -> dict[str, dict]:
        """Per engine with MoE layers: routing counts and EP balance (`serving.expert_stats`)."""
        s = self.scheduler
        engines = [s.decode] + ([s.prefill] if s.prefill is not None else [])
        return {e.name: e.expert_stats.summary() for e in engines if e.expert_stats.shape[0]}

    def close(self) -> None:
        self.scheduler.close()   # and its page pools (prefix-cache offload threads)


class RemoteBackend:
    """Worker processes behind a router: an in-process `Router` (`workers=[...]`) or a running router process
    (`router="host:port"`, a `RouterClient`). The workers own the engines; this side validates prompts against
    their engine settings, streams tokens and applies the stop rules (a stop string seen here aborts the remote
    request)."""

    def __init__(self, router: Router | RouterClient, engine_info: dict,
                 ):
        self.router = router
        self.engine_info = engine_info
        self.max_model_len = int(engine_info["max_model_len"])
        self.vocab_size = int(engine_info["vocab_size"])
        self.eos_ids = tuple(engine_info.get("eos_ids") or ())
        self._live: dict[str, Request] = {}
        self._submitted: dict[str, float] = {}   # request id -> when it went to the router (its queue span)
        self._closed_pages: dict | None = None

    @classmethod
    def connect(cls, *, workers: Sequence[str] | None, router: str | None, token: str | None,
                router_config: RouterConfig | None, ready_timeout_s: float = 120.0) -> "RemoteBackend":
        if bool(workers) == bool(router):
            raise ValueError("give exactly one of workers=[addr, ...] or router='host:port'")
        if workers:
            cfg = router_config or RouterConfig(token=token)
            if cfg.token is None:
                cfg = dataclasses.replace(cfg, token=token)
            r = Router(list(workers), cfg)
            try:
                snap = r.wait_until(lambda s: any(w["alive"] and w["role"] == "decode"
                                                  for w in s["workers"].values()), ready_timeout_s)
            except TimeoutError:
                r.close()
                raise TimeoutError(f"no decode worker among {list(workers)} answered within {ready_timeout_s:.0f}s "
                                   "(are they started, with the same TANDEM_TOKEN?)") from None
            info = next(w["info"]["engine"] for w in snap["workers"].values()
                        if w["alive"] and w["role"] == "decode")
            try:   # give the others a few heartbeats to answer too (a worker that is down joins when it's up)
                r.wait_until(lambda s: all(w["alive"] for w in s["workers"].values()), 2 * cfg.heartbeat_s + 2.0)
            except TimeoutError:
                pass
            return cls(r, info)
        client = RouterClient(router, token)
        info = client.info.get("engine")
        if not info:
            client.close()
            raise RuntimeError(f"router {router} has no live worker yet")
        return cls(client, info)

    def submit(self, req: Request) -> None:
        if req.id in self._live:
            raise ValueError(f"request id {req.id!r} is already in flight")
        self._live[req.id] = req
        req.status = Status.RUNNING
        self.router.submit(req.id, req.prompt_ids.tolist(), sampling_to_wire(req.params, req.seed), req.limit,
                           req.trace)
        self._submitted[req.id] = time.perf_counter()

    def abort(self, request_id: str) -> None:
        self.router.abort(request_id)

    def has_work(self) -> bool:
        return bool(self._live)

    def events(self, timeout: float = 1.0) -> list[Event]:
        """The router's token events applied to the requests (stops, limits, text, metrics)."""
        out = []
        for ev in self.router.events(timeout):
            req = self._live.get(ev["rid"])
            if req is None:
                continue
            now = time.perf_counter()
            m = ev.get("metrics") or {}
            if ev.get("spans"):   # the workers' spans of a traced request, passed on by a router process
                tracing.ingest(ev["spans"])
            if m.get("queue_s") is not None:
                sub = self._submitted.pop(req.id, None)
                if sub is not None:   # its queue span: arrival here -> the router dispatched it (the router's
                    # wall clock when it sent it; else its queue time after the submission, which adds the hop)
                    tracing.span(req.trace, "queue", req.arrival, tracing.perf_of(m.get("dispatch_ns"),
                                                                                 sub + m["queue_s"]),
                                 {"tandem.request_id": req.id, "tandem.router_queue_s": m["queue_s"]})
                req.prefill_start = req.arrival + m["queue_s"] + (m.get("prefill_queue_s") or 0.0)
                req.prefill_end = req.prefill_start + (m.get("prefill_s") or 0.0) + (m.get("transfer_s") or 0.0)
                req.transfer_s, req.attempts, req.workers = m.get("transfer_s"), m.get("attempts"), m.get("workers")
                req.router_metrics = m
            event, reason = Event(req, [], "", False), None
            if ev.get("prompt_logprobs") is not None:
                req.prompt_logprobs = logprobs_from_wire({"prompt_logprobs": ev["prompt_logprobs"]})["prompt_logprobs"]
            if ev["tokens"] and req.finish_reason is None:
                lps = ev.get("logprobs")
                if req.first_token_time is None and "sent_ns" in ev:   # the first token's trip from its worker
                    tracing.span(req.trace, "deliver", tracing.perf_of(ev["sent_ns"], now), now,
                                 {"tandem.request_id": req.id})
                event, reason = append_tokens(req, ev["tokens"], now, self.eos_ids, None,
                                              None if lps is None else [TokenLogprobs.from_wire(w) for w in lps])
            if reason is not None and not ev["finished"]:
                self.router.abort(req.id)              # a stop rule ended it here: end the remote request
            if ev["finished"] or reason is not None:
                if ev["finished"] and (reason is None or ev["reason"] == "error"):
                    reason = ev["reason"] or "stop"
                    req.error = ev.get("error")
                if req.text_stopped:                   # a stop string ended it (the text stage), then an abort
                    reason = "stop"
                req.finish_reason, req.status, req.finish_time = reason, Status.FINISHED, now
                self._live.pop(req.id, None)
                self._submitted.pop(req.id, None)
                out.append(Event(req, event.new_token_ids, event.new_text, True, event.new_logprobs))
            elif event.new_token_ids:
                out.append(event)
        return out

    def page_stats(self) -> dict[str, dict[str, int]]:
        """{worker: {free, used, leased, total}} of every live worker (the last view once closed)."""
        if self._closed_pages is not None:
            return self._closed_pages
        snap = self.router.snapshot()
        return {a: w["info"]["pages"] for a, w in snap["workers"].items()
                if w.get("alive") and (w.get("info") or {}).get("pages")}

    def prefix_cache_stats(self) -> dict[str, dict]:
        """{worker: prefix-cache stats} of every live worker with prefix caching on."""
        snap = self.router.snapshot()
        return {a: w["info"]["prefix_cache"] for a, w in snap["workers"].items()
                if w.get("alive") and (w.get("info") or {}).get("prefix_cache")}

    def expert_stats(self) -> dict[str, dict]:
        """{worker: routing counts and EP balance} of every live worker with MoE layers."""
        snap = self.router.snapshot()
        return {a: w["info"]["experts"] for a, w in snap["workers"].items()
                if w.get("alive") and (w.get("info") or {}).get("experts")}

    def close(self) -> None:
        if self._closed_pages is None:
            try:
                self._closed_pages = self.page_stats()
            except (TimeoutError, RuntimeError, OSError) as e:  # the router may be gone: nothing to report
                log.warning("router unreachable at close: %s", e)
                self._closed_pages = {}
            self.router.close()

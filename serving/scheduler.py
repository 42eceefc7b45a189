"""Continuous batching over one decode engine, with prefill colocated or disaggregated onto its own engine.

Colocated (`prefill_engine is None`): each `step()` admits waiting requests whose pages fit, runs *one* prefill
chunk, then one decode dispatch — long prompts are interleaved with decoding instead of stalling it.

Disaggregated: a prefill thread owns the prefill engine (its own mesh, weights and cache). It prefills a request
into prefill-side pages, extracts them as a `Prefix`, frees those pages, and moves the prefix onto the decode
mesh (`jax.device_put`, resharding if layouts differ). `step()` on the caller's thread inserts ready prefixes
into decode pages and runs decode dispatches; decode never waits behind a prefill.

Admission: a request is given, up front, every decode page it can need (prompt + max new tokens, capped by
max_model_len); when they are not free it waits. So there is no out-of-memory mid-generation, and abort,
finish and failure all release exactly the pages that were taken.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

from serving.engine import DecodeBatch, Engine, Prefix
from serving.sampling import SamplingParams, sampling_arrays

log = logging.getLogger(__name__)


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    id: str
    prompt_ids: np.ndarray
    params: SamplingParams
    seed: int
    limit: int                                   # max new tokens after capping by max_model_len
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    pages: list[int] = dataclasses.field(default_factory=list)          # decode-side pages
    chunks: list = dataclasses.field(default_factory=list)              # colocated prefill progress
    finish_reason: str | None = None                                    # stop | length | abort | error
    error: str | None = None
    aborted: bool = False
    draft: int = 0                                # MTP: drafted token after the last one
    draft_q: np.ndarray | None = None             # MTP: its distribution
    spec_proposed: int = 0                        # MTP drafts verified
    spec_accepted: int = 0                        # ... and accepted
    # metrics
    prefill_start: float | None = None
    prefill_end: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None

    @property
    def position(self) -> int:
        """Position of the last token (the one the next decode step consumes)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def sampling_row(self) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in sampling_arrays([self.params], [self.seed]).items()}


@dataclasses.dataclass
class Event:
    """A streamed update: tokens appended to `request` since the last event (and its new text)."""

    request: Request
    new_token_ids: list[int]
    new_text: str
    finished: bool


class Scheduler:
    def __init__(self, decode: Engine, prefill: Engine | None = None, *, eos_ids: tuple[int, ...] = (),
                 detokenize: Callable[[list[int]], str] | None = None):
        self.decode, self.prefill = decode, prefill
        self.eos_ids = tuple(eos_ids)
        self.detokenize = detokenize
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []          # colocated: admitted, prompt not finished
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._events: list[Event] = []
        # prefixes ready for decode: from the prefill thread, or from another process (`add_prefilled`)
        self._ready: collections.deque[tuple[Request, Prefix | None, str | None]] = collections.deque()
        self._ready_cv = threading.Condition()
        self._in_prefill = 0
        if prefill is not None:
            self._to_prefill: queue.Queue[Request | None] = queue.Queue()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._prefill_loop, name="prefill", daemon=True)
            self._thread.start()

    # ---- requests ---------------------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        with self._lock:
            if req.id in self.requests and self.requests[req.id].status != Status.FINISHED:
                raise ValueError(f"request id {req.id!r} is already in flight")
            self.requests[req.id] = req
            if self.prefill is None:
                self.waiting.append(req)
            else:
                self._in_prefill += 1
                self._to_prefill.put(req)

    def add_prefilled(self, req: Request, prefix: Prefix | None, error: str | None = None) -> None:
        """A request prefilled elsewhere (another process): `prefix` is already on the decode engine's devices.
        It joins the ready queue and is inserted by `step()` when its decode pages are free."""
        with self._lock:
            if req.id in self.requests and self.requests[req.id].status != Status.FINISHED:
                raise ValueError(f"request id {req.id!r} is already in flight")
            self.requests[req.id] = req
            req.status = Status.PREFILLING
            self._ready.append((req, prefix, error))
        self._ready_cv_notify()

    def abort(self, request_id: str) -> None:
        """End a request now; its pages are released at once (or when its prefill returns)."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None or req.status == Status.FINISHED:
                return
            req.aborted = True
            if req in self.waiting:
                self.waiting.remove(req)
                self._finish(req, "abort")
            elif req in self.prefilling:
                self.prefilling.remove(req)
                self._finish(req, "abort")
            elif req in self.running:
                self.running.remove(req)
                self._finish(req, "abort")
            # disaggregated and inside the prefill thread: finished when the prefix comes back

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.prefilling or self.running or self._ready) or self._in_prefill > 0

    def close(self) -> None:
        if self.prefill is not None:
            self._stop.set()
            self._to_prefill.put(None)
            self._thread.join(timeout=30)

    # ---- one scheduling step (caller's thread) -------------------------------------------------------------------
    def step(self) -> list[Event]:
        if self.prefill is None:
            self._admit_colocated()
            self._prefill_chunks()
        if self._ready:
            self._insert_ready()
        if self.running:
            self._decode()
        elif self.prefill is not None and not self.prefilling:
            self._wait_for_prefill()
        with self._lock:
            events, self._events = self._events, []
        return events

    def _pages_for(self, req: Request) -> int:
        return self.decode.pages_needed(len(req.prompt_ids) + req.limit)

    def _admit_colocated(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) + len(self.prefilling) < self.decode.cfg.max_batch:
                req = self.waiting[0]
                n = self._pages_for(req)
                if not self.decode.allocator.can_allocate(n):
                    break  # FIFO: the head waits for pages, nobody overtakes it
                self.waiting.popleft()
                req.pages = self.decode.allocator.allocate(n)
                req.chunks = self.decode.prefill_chunks(len(req.prompt_ids))
                req.status = Status.PREFILLING
                self.prefilling.append(req)

    def _prefill_chunks(self) -> None:
        """Prefill chunks of the admitted requests, in order, until this step's token budget is spent (at least
        one chunk), so a burst of short prompts starts decoding together while a long prompt is still chunked."""
        budget = self.decode.cfg.prefill_budget
        while self.prefilling and budget > 0:
            budget -= self._prefill_one_chunk()

    def _prefill_one_chunk(self) -> int:
        req = self.prefilling[0]
        if req.prefill_start is None:
            req.prefill_start = time.perf_counter()
        chunk = req.chunks.pop(0)
        out = self.decode.prefill_chunk(req.prompt_ids, chunk, req.pages, req.sampling_row())
        if req.aborted and req not in self.prefilling:
            return chunk[2]
        if not req.chunks:
            req.prefill_end = time.perf_counter()
            req.draft, req.draft_q = out.draft, out.draft_q
            with self._lock:
                if req in self.prefilling:  # else aborted meanwhile (already finished)
                    self.prefilling.remove(req)
                    self._start_running(req, out.token)
        return chunk[2]

    def _start_running(self, req: Request, first_token: int) -> None:
        req.status = Status.RUNNING
        self.running.append(req)
        self._append(req, [first_token], time.perf_counter())

    def _decode(self) -> None:
        with self._lock:
            rows = list(self.running)
        batch = DecodeBatch(
            tokens=np.array([r.output_ids[-1] for r in rows], np.int32),
            positions=np.array([r.position for r in rows], np.int32),
            page_tables=np.stack([self.decode.page_table(r.pages) for r in rows]),
            sampling=sampling_arrays([r.params for r in rows], [r.seed for r in rows]))
        if self.decode.cfg.mtp:
            batch.drafts = np.array([r.draft for r in rows], np.int32)
            batch.draft_q = np.stack([r.draft_q for r in rows])
        out = self.decode.generate(batch)
        now = time.perf_counter()
        with self._lock:
            for i, r in enumerate(rows):
                if r.status == Status.RUNNING:  # not aborted meanwhile
                    if out.drafts is not None:
                        r.draft, r.draft_q = int(out.drafts[i]), out.draft_q[i]
                        r.spec_proposed += int(out.proposed[i])
                        r.spec_accepted += int(out.accepted[i])
                    self._append(r, out.tokens[i], now)

    # ---- token bookkeeping: stops, limits, text -------------------------------------------------------------------
    def _append(self, req: Request, tokens: list[int], now: float) -> None:
        """Add tokens (already under self._lock or on the only thread touching `req`), apply stop rules."""
        new, reason = [], None
        stop_ids = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(self.eos_ids))
        for t in tokens:
            new.append(t)
            if t in stop_ids:
                reason = "stop"
                break
            if len(req.output_ids) + len(new) >= req.limit:
                reason = "length"
                break
        if req.first_token_time is None:
            req.first_token_time = now
        req.output_ids.extend(new)
        req.token_times.extend([now] * len(new))
        old_text = req.text
        if self.detokenize is not None:
            ids = req.output_ids[:-1] if reason == "stop" and req.output_ids[-1] in stop_ids else req.output_ids
            text = self.detokenize(ids)
            for s in req.params.stop:
                i = text.find(s)
                if i >= 0:
                    text, reason = text[:i], "stop"
            req.text = text
        new_text = req.text[len(old_text):] if req.text.startswith(old_text) else req.text
        self._events.append(Event(req, new, new_text, reason is not None))
        if reason is not None:
            if req in self.running:
                self.running.remove(req)
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.finish_time = time.perf_counter()
        if req.pages:
            self.decode.allocator.release(req.pages)
            req.pages = []
        if reason in ("abort", "error"):
            self._events.append(Event(req, [], "", True))

    # ---- disaggregated: the prefill thread and the hand-off -------------------------------------------------------
    def _prefill_loop(self) -> None:
        eng = self.prefill
        while not self._stop.is_set():
            req = self._to_prefill.get()
            if req is None:
                return
            prefix, err = None, None
            try:
                if not req.aborted:
                    n = eng.pages_needed(len(req.prompt_ids))
                    pages = self._wait_pages(eng, n)
                    try:
                        req.prefill_start = time.perf_counter()
                        out = eng.prefill(req.prompt_ids, pages, req.sampling_row())
                        prefix = eng.extract(pages, len(req.prompt_ids), out)
                    finally:
                        eng.allocator.release(pages)
                    prefix = self.decode.receive(prefix)      # device_put onto the decode mesh
                    req.prefill_end = time.perf_counter()
            except Exception as e:  # a failed prefill ends that request, never the loop
                log.exception("prefill of %s failed", req.id)
                err = f"prefill failed: {e}"
            with self._lock:
                self._ready.append((req, prefix, err))
                self._in_prefill -= 1
                self._ready_cv_notify()

    @staticmethod
    def _wait_pages(eng: Engine, n: int) -> list[int]:
        # One prefill thread, and it frees a request's pages before taking the next: everything is free here.
        if not eng.allocator.can_allocate(n):
            raise RuntimeError(f"prompt needs {n} pages, the prefill cache has {eng.allocator.free} free of "
                               f"{eng.allocator.total}")
        return eng.allocator.allocate(n)

    def _ready_cv_notify(self) -> None:
        with self._ready_cv:
            self._ready_cv.notify_all()

    def _wait_for_prefill(self) -> None:
        """Nothing to decode: block until a prefix is ready (bounded, so callers can re-check state)."""
        with self._ready_cv:
            if not self._ready:
                self._ready_cv.wait(timeout=1.0)

    def _insert_ready(self) -> None:
        with self._lock:
            while self._ready and len(self.running) < self.decode.cfg.max_batch:
                req, prefix, err = self._ready[0]
                if err is not None or req.aborted:
                    self._ready.popleft()
                    self._finish(req, "error" if err else "abort", err)
                    continue
                n = self._pages_for(req)
                if not self.decode.allocator.can_allocate(n):
                    break
                self._ready.popleft()
                req.pages = self.decode.allocator.allocate(n)
                self.decode.insert(prefix, req.pages)
                req.draft, req.draft_q = prefix.draft, prefix.draft_q
                self._start_running(req, prefix.first_token)

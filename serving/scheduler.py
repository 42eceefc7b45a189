"""Continuous batching over one decode engine, with prefill colocated or disaggregated onto its own engine.

Colocated (`prefill_engine is None`): each `step()` admits waiting requests whose pages fit, prefills chunks of
the admitted prompts until this step's prompt-token budget is spent (`SchedulerConfig.step_budget`: grows with the
admitted prompts' tokens left, between `prefill_budget` and `prefill_budget_max`; at least one chunk), then runs
one decode dispatch — long prompts are interleaved with decoding instead of stalling it.

Disaggregated: a prefill thread owns the prefill engine (its own mesh, weights and cache). It prefills a request
into prefill-side pages, extracts them as a `Prefix`, frees those pages, and moves the prefix onto the decode
mesh (`jax.device_put`, resharding if layouts differ). `step()` on the caller's thread inserts ready prefixes
into decode pages and runs decode dispatches; decode never waits behind a prefill.

Admission: a request is given, up front, every decode page it can need (prompt + max new tokens, capped by
max_model_len); when they are not free it waits. So there is no out-of-memory mid-generation, and abort,
finish and failure all release exactly the pages that were taken.

`requests` holds the requests in flight only: a finished request leaves it (its `Request` object lives on in the
events handed to the caller), so a long-running server's memory stays flat.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

from serving.api import Event, Request, Status
from serving.batched_prefill import PrefillJob, prefill_many
from serving.config import SchedulerConfig
from serving.engine import DecodeBatch, Engine, Prefix
from serving.grammar import consume, mask_of, prefill_row
from serving.logits import needs_processing
from serving.pages import PagePool
from serving.sampling import sampling_arrays
from serving.stops import append_tokens

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, decode: Engine, prefill: Engine | None = None, *, config: SchedulerConfig | None = None,
                 eos_ids: tuple[int, ...] = (), detokenize: Callable[[list[int]], str] | None = None):
        self.decode, self.prefill = decode, prefill
        # the scheduler side owns the pages: who holds which, and which hold a cached prefix
        self.pages = PagePool(decode)
        self.prefill_pages = PagePool(prefill) if prefill is not None else None
        self.config = config or SchedulerConfig()
        self.max_batch = min(self.config.max_batch or decode.max_batch, decode.max_batch)
        # data-parallel attention: each of the decode engine's R ranks runs at most max_batch / R rows
        self.rank_batch = max(1, decode.max_batch // decode.ranks)
        self.eos_ids = tuple(eos_ids)
        self.detokenize = detokenize
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []          # colocated: admitted, prompt not finished
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}      # in flight only
        self._lock = threading.Lock()
        self._events: list[Event] = []
        # prefixes ready for decode: from the prefill thread, or from another process (`add_prefilled`)
        self._ready: collections.deque[tuple[Request, Prefix | None, str | None]] = collections.deque()
        self._ready_cv = threading.Condition()
        self._in_prefill = 0
        self.prefill_stats: collections.Counter = collections.Counter()   # disaggregated: calls and rows
        self._decode_next = False   # colocated: the last step returned first tokens; this one decodes
        self._inflight: tuple[list[Request], Callable] | None = None   # overlapped decode: dispatch n, unread
        self.decode_stats: collections.Counter = collections.Counter()   # decode dispatches, overlapped ones
        if prefill is not None:
            self._to_prefill: queue.Queue[Request | None] = queue.Queue()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._prefill_loop, name="prefill", daemon=True)
            self._thread.start()

    # ---- requests ---------------------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        with self._lock:
            if req.id in self.requests:
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
            if req.id in self.requests:
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
            return (bool(self.waiting or self.prefilling or self.running or self._ready) or self._in_prefill > 0
                    or self._inflight is not None)

    def close(self) -> None:
        if self.prefill is not None:
            self._stop.set()
            self._to_prefill.put(None)
            self._thread.join(timeout=30)
        for pool in filter(None, (self.pages, self.prefill_pages)):
            pool.close()

    def stats(self) -> dict[str, int]:
        """Requests in flight by state: waiting for pages, prefilling (colocated chunks), in the prefill thread
        (disaggregated), ready (prefilled, waiting for decode pages), running."""
        with self._lock:
            return {"waiting": len(self.waiting), "prefilling": len(self.prefilling), "in_prefill": self._in_prefill,
                    "ready": len(self._ready), "running": len(self.running)}

    # ---- one scheduling step (caller's thread) -------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Colocated: admit and prefill (up to the budget); when that produced first tokens, return them now and run
        the decode dispatch as the next step (a first token never waits behind a decode dispatch; decode never waits
        behind more than one step's prefill). Then insert ready prefixes and decode."""
        if self.prefill is None and not self._decode_next:
            self._admit_colocated()
            self._prefill_chunks()
            with self._lock:
                if self._events and self.running:
                    self._decode_next = True
                    events, self._events = self._events, []
                    return events
        self._decode_next = False
        if self._ready:
            self._insert_ready()
        if self.running or self._inflight is not None:
            self._decode()
        elif self.prefill is not None and not self.prefilling:
            self._wait_for_prefill()
        with self._lock:
            events, self._events = self._events, []
        return events

    def _row(self, req: Request) -> dict:
        return prefill_row(req, self.decode.model_cfg.vocab_size) if req.matcher is not None else req.sampling_row()

    def _pages_for(self, req: Request) -> int:
        return self.decode.pages_needed(len(req.prompt_ids) + req.limit)

    def _room(self, n_pages: int, hashes: list[int] | None) -> tuple[np.ndarray, list[int], list[bool]]:
        """Per rank: rows running, leading blocks of `hashes` it holds, whether it has a free row and room for
        `n_pages` less those blocks."""
        a = self.pages.allocator
        load = np.bincount([a.rank_of(r.pages[0]) for r in self.running + self.prefilling if r.pages],
                           minlength=self.decode.ranks)
        hit = [a.match(hashes, r) if hashes else 0 for r in range(self.decode.ranks)]
        return load, hit, [load[r] < self.rank_batch and a.can_allocate(n_pages - hit[r], r)
                           for r in range(self.decode.ranks)]

    def _pick_rank(self, n_pages: int, hashes: list[int] | None = None, among=None) -> int | None:
        """The attention rank for a new request: one with a free row and room for `n_pages` (less the blocks of
        its prompt it holds cached), the longest cached prefix first, then the most free pages (KV-aware,
        balances both); None when no rank has room. `among`: only these ranks (a prefix a group member holds)."""
        load, hit, fits = self._room(n_pages, hashes)
        ok = [r for r in (range(self.decode.ranks) if among is None else among) if fits[r]]
        free = self.pages.allocator.free_in
        return max(ok, key=lambda r: (hit[r], free(r), -load[r], -r)) if ok else None

    def owner_for(self, n_pages: int, owners: dict[int, list[int]], pending: collections.Counter,
                  hashes: list[int] | None = None) -> int | None:
        """A worker group pulling KV straight into a member: the process (`owners`: process -> its ranks) whose
        ranks should take a request of `n_pages` — the one holding most of its cached prefix, then the fewest rows
        per rank (running, plus `pending`: pulled or pulling for it), then the most free pages; None when no rank
        has room now (the leader pulls; any rank takes it)."""
        with self._lock:
            load, hit, fits = self._room(n_pages, hashes)
            ok = {p: [r for r in rs if fits[r]] for p, rs in owners.items()}
            ok = {p: rs for p, rs in ok.items() if rs}
            free = self.pages.allocator.free_in
            return min(ok, key=lambda p: (-max(hit[r] for r in ok[p]),
                                          (sum(load[r] for r in owners[p]) + pending[p]) / len(owners[p]),
                                          -sum(free(r) for r in ok[p]), p)) if ok else None

    def _admit_colocated(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch:
                req = self.waiting[0]
                n = self._pages_for(req)
                hashes = self.pages.hashes(req.prompt_ids, req.salt) if req.cacheable else []
                rank = self._pick_rank(n, hashes)
                got = None if rank is None else self.pages.acquire(req.prompt_ids, n, rank, hashes)
                if got is None:
                    break  # FIFO: the head waits for pages, nobody overtakes it
                self.waiting.popleft()
                req.pages, req.cached_tokens = got
                req.chunks = self.decode.prefill_chunks(len(req.prompt_ids) - req.cached_tokens, req.cached_tokens)
                req.status = Status.PREFILLING
                self.prefilling.append(req)

    def _prefill_chunks(self) -> None:
        """Prefill chunks of the admitted requests, in order, until this step's token budget is spent (at least
        one chunk), so a burst of short prompts starts decoding together while a long prompt is still chunked.
        Next chunks of the same bucket from several requests go in one batched call (`Engine.prefill_batch`)."""
        budget = self.config.step_budget(sum(c[1] for r in self.prefilling for c in r.chunks))
        self.prefill_stats["colocated_budget"] = budget
        while self.prefilling and budget > 0:
            budget -= self._prefill_group(budget)

    def _prefill_group(self, budget: int) -> int:
        """One prefill call: the first admitted request's next chunk and the next chunks of the same bucket of the
        requests after it — as many as the largest row bucket that they and the budget fill (no padding rows; the
        rest go in the next call). Returns the tokens run."""
        first = self.prefilling[0]
        T = first.chunks[0][2]
        same = [first] + [r for r in self.prefilling[1:] if r.chunks and r.chunks[0][2] == T]
        fill = max(1, min(len(same), budget // T))
        group = same[: max(r for r in self.decode.cfg.rows_for(T) if r <= fill)]
        now = time.perf_counter()
        for req in group:
            if req.prefill_start is None:
                req.prefill_start = now
        chunks = [req.chunks.pop(0) for req in group]
        outs = self.decode.prefill_batch([(req.prompt_ids, c, req.pages, self._row(req))
                                          for req, c in zip(group, chunks)])
        for req, out in zip(group, outs):
            if out.prompt_logprobs is not None:
                req.prompt_logprobs = (req.prompt_logprobs or []) + out.prompt_logprobs
            if (req.aborted and req not in self.prefilling) or req.chunks:
                continue
            req.prefill_end = time.perf_counter()
            req.draft, req.draft_q = out.draft, out.draft_q
            self.pages.cache_prefix(req.pages, np.append(req.prompt_ids, out.token), len(req.prompt_ids), req.salt)
            with self._lock:
                if req in self.prefilling:  # else aborted meanwhile (already finished)
                    self.prefilling.remove(req)
                    self._start_running(req, out.token, out.logprobs)
        return T * len(group)

    def _start_running(self, req: Request, first_token: int, logprobs=None) -> None:
        req.status = Status.RUNNING
        self.running.append(req)
        self._append(req, [first_token], time.perf_counter(), None if logprobs is None else [logprobs])

    def _decode(self) -> None:
        """One decode dispatch over the running rows. Overlapped (`SchedulerConfig.overlap_decode`; not while a row's
        next step needs host state: logits processors, a grammar): dispatch n+1 is queued first, starting from
        dispatch n's last tokens, positions and MTP drafts where they lie on the device, and only then are dispatch
        n's outputs read and booked (tokens, stops, events) — the device never waits for the host between
        dispatches. Rows that dispatch n may end by length (with MTP it emits S to 2S tokens) are left out of n+1;
        a row ending on a stop token runs one dispatch too many (discarded: its pages were reserved up front, the
        extra KV lies past its end)."""
        prev, self._inflight = self._inflight, None
        with self._lock:
            rows = list(self.running)
        overlap = (self.config.overlap_decode
                   and not any(r.matcher is not None or needs_processing(r.params) for r in rows))
        if prev is not None and not overlap:
            self._book(*prev)
            prev = None
            with self._lock:
                rows = list(self.running)
        ahead, src = self._ahead(), {}
        if prev is not None:   # rows in dispatch n continue from its tokens, up to `ahead` positions on
            src = {id(r): i for i, r in enumerate(prev[0])}
            rows = [r for r in rows if id(r) not in src or r.limit - len(r.output_ids) > ahead]
        nxt = (rows, self.decode.dispatch(self._batch(rows, src))) if rows else None
        self.decode_stats["dispatches"] += nxt is not None
        self.decode_stats["overlapped"] += nxt is not None and prev is not None
        if prev is not None:
            self._book(*prev)
        if nxt is not None:
            if overlap:
                self._inflight = nxt
            else:
                self._book(*nxt)

    def _ahead(self) -> int:
        """The most tokens one dispatch emits per row: S steps, each 1 token (with MTP 1 or 2)."""
        return self.decode.cfg.decode_steps * (2 if self.decode.cfg.mtp else 1)

    def _batch(self, rows: list[Request], src: dict[int, int]) -> DecodeBatch:
        """The decode batch of `rows`; those in `src` (id -> row of the dispatch in flight) continue from it (their
        position here: a bound, for the attention window; the device has the real one)."""
        ahead = self._ahead()
        batch = DecodeBatch(
            tokens=np.array([0 if id(r) in src else r.output_ids[-1] for r in rows], np.int32),
            src=np.array([src.get(id(r), -1) for r in rows], np.int32),
            positions=np.array([r.position + (ahead if id(r) in src else 0) for r in rows], np.int32),
            page_tables=np.stack([self.decode.page_table(r.pages) for r in rows]),
            sampling=sampling_arrays([r.params for r in rows], [r.seed for r in rows]),
            ranks=np.array([self.decode.rank_of(r.pages[0]) for r in rows], np.int64),
            params=[r.params for r in rows],
            masks=[None if r.matcher is None else mask_of(r.matcher, self.decode.model_cfg.vocab_size) for r in rows])
        if any(needs_processing(r.params) for r in rows):   # the processors count the tokens so far
            batch.histories = [np.concatenate([r.prompt_ids, np.asarray(r.output_ids, np.int32)]) for r in rows]
            batch.prompt_lens = np.array([len(r.prompt_ids) for r in rows], np.int32)
        if self.decode.cfg.mtp:
            batch.drafts = np.array([r.draft for r in rows], np.int32)
            W = self.decode.model_cfg.vocab_size   # rows continuing on the device take theirs there: not read
            batch.draft_q = np.stack([np.zeros(W, np.float32) if id(r) in src else np.asarray(r.draft_q, np.float32)
                                      for r in rows])
        return batch

    def _book(self, rows: list[Request], pending) -> None:
        """Read a dispatch's outputs (waits for it) and add its tokens to the rows still running."""
        out = pending()
        now = time.perf_counter()
        with self._lock:
            for i, r in enumerate(rows):
                if r.status != Status.RUNNING:  # aborted meanwhile
                    continue
                before = len(r.output_ids)
                toks, lps = out.tokens[i], out.logprobs[i] if out.logprobs else None
                if r.matcher is not None:   # the grammar's mask held for the dispatch's first token only
                    toks, lps = toks[:1], None if lps is None else lps[:1]
                self._append(r, toks, now, lps)
                if out.drafts is not None:
                    r.draft, r.draft_q = int(out.drafts[i]), out.draft_q[i]
                    # count only the verify steps whose tokens were kept (not those past a stop or the limit)
                    kept, done = len(r.output_ids) - before, 0
                    for size, ok in zip(out.step_sizes[i], out.accepted[i]):
                        if done >= kept:
                            break
                        r.spec_proposed += 1
                        r.spec_accepted += int(ok)
                        done += size

    # ---- token bookkeeping: stops, limits, text (serving.stops, incremental) -----------------------------------
    def _append(self, req: Request, tokens: list[int], now: float, logprobs: list | None = None) -> None:
        """Add tokens (under self._lock, or on the only thread touching `req`) and end the request on a stop."""
        event, reason = append_tokens(req, tokens, now, self.eos_ids, self.detokenize, logprobs)
        err = None
        if req.matcher is not None and reason is None:
            err = consume(req.matcher, event.new_token_ids)
            if err is not None:
                reason = "error"
            elif req.matcher.is_stopped():   # the grammar is complete: nothing more may follow
                reason = "stop"
                event = dataclasses.replace(event, finished=True)
        self._events.append(event)
        if reason is not None:
            if req in self.running:
                self.running.remove(req)
            self._finish(req, reason, err)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.status == Status.RUNNING and req.pages and not self.decode.cfg.mtp:
            # the KV of every token but the last one is written: offer its full blocks to the prefix cache
            # (multi-turn chat resends this history). With MTP only prompt blocks are cached (see prefix_cache).
            toks = np.concatenate([req.prompt_ids, np.asarray(req.output_ids, np.int32)])
            self.pages.cache_prefix(req.pages, toks, len(toks) - 1, req.salt)
        req.status = Status.FINISHED
        req.finish_reason = "stop" if req.text_stopped else reason   # a stop string, then the abort that ended it
        req.error = error
        req.finish_time = time.perf_counter()
        if req.pages:
            self.pages.release(req.pages)
            req.pages = []
        self.requests.pop(req.id, None)
        req.chunks, req.draft_q, req.matcher = [], None, None
        if reason in ("abort", "error"):
            self._events.append(Event(req, [], "", True))

    # ---- disaggregated: the prefill thread and the hand-off -------------------------------------------------------
    def _prefill_loop(self) -> None:
        """Take whatever is queued (up to the engine's largest row bucket), prefill it batched
        (`serving.batched_prefill`), and hand each prefix to decode as soon as its prompt is done."""
        rows = self.prefill.cfg.prefill_rows[-1]
        carry: collections.deque[Request] = collections.deque()   # did not fit the pages of the last batch
        closing = False
        while not self._stop.is_set():
            batch = [carry.popleft() for _ in range(min(rows, len(carry)))]
            while len(batch) < rows and not closing:
                try:
                    req = self._to_prefill.get_nowait() if batch else self._to_prefill.get()
                except queue.Empty:
                    break
                if req is None:
                    closing = True
                else:
                    batch.append(req)
            if not batch:
                return
            self._prefill_batch(batch, carry)

    def _prefill_batch(self, batch: list[Request], carry: collections.deque) -> None:
        eng, pool = self.prefill, self.prefill_pages
        taken, jobs = [], []
        for k, req in enumerate(batch):
            if req.aborted:
                self._deliver(req, None, None)
                continue
            n = eng.pages_needed(len(req.prompt_ids))
            got = pool.acquire(req.prompt_ids, n, hashes=None if req.cacheable else [], salt=req.salt)
            if got is None and taken:   # the pages of this batch's requests come back after it: retry then
                carry.extendleft(reversed(batch[k:]))
                break
            if got is None:
                self._deliver(req, None, f"prefill failed: prompt needs {n} pages, the prefill cache has "
                              f"{pool.allocator.free_in(0)} free of {pool.allocator.total}")
                continue
            req.cached_tokens = got[1]
            req.prefill_start = time.perf_counter()
            taken.append((req, got[0]))
            jobs.append(PrefillJob(req.prompt_ids, got[0], self._row(req), got[1]))
        done = set()
        try:
            for i, out in prefill_many(eng, jobs, self.prefill_stats):
                req, pages = taken[i]
                done.add(i)
                prefix, err, released = None, None, False
                try:
                    pool.cache_prefix(pages, np.append(req.prompt_ids, out.token), len(req.prompt_ids), req.salt)
                    skip = self._decode_holds(req)   # leading pages the decode side caches: not sent
                    prefix = eng.extract(pages[skip:], len(req.prompt_ids), out)
                    prefix.skip = skip
                    pool.release(pages)
                    released = True
                    prefix = self.decode.receive(prefix)      # device_put onto the decode mesh
                    req.prefill_end = time.perf_counter()
                except Exception as e:  # a failed hand-off ends that request, never the loop
                    log.exception("prefill of %s failed", req.id)
                    if not released:
                        pool.release(pages)
                    prefix, err = None, f"prefill failed: {e}"
                self._deliver(req, prefix, err)
        except Exception as e:  # the batch failed: its unfinished requests end with the error
            log.exception("batched prefill of %s failed", [r.id for r, _ in taken])
            for i, (req, pages) in enumerate(taken):
                if i not in done:
                    pool.release(pages)
                    self._deliver(req, None, f"prefill failed: {e}")

    def _decode_holds(self, req: Request) -> int:
        """Leading prompt pages some decode rank holds in its prefix cache (device-resident), at most all but the
        last prompt page: those pages need not be sent. 0 without decode-side prefix caching."""
        if self.pages.prefix_cache is None or req.send_all:
            return 0
        hashes = self.pages.hashes(req.prompt_ids, req.salt)
        with self._lock:
            held = max(self.pages.allocator.match(hashes, r) for r in range(self.decode.ranks))
        return max(0, min(held, self.prefill.pages_needed(len(req.prompt_ids)) - 1))

    def _deliver(self, req: Request, prefix: Prefix | None, err: str | None) -> None:
        with self._lock:
            self._ready.append((req, prefix, err))
            self._in_prefill -= 1
            self._ready_cv_notify()

    def _ready_cv_notify(self) -> None:
        with self._ready_cv:
            self._ready_cv.notify_all()

    def _wait_for_prefill(self) -> None:
        """Nothing to decode: block until a prefix is ready (bounded, so callers can re-check state)."""
        with self._ready_cv:
            if not self._ready:
                self._ready_cv.wait(timeout=1.0)

    def ready_owners(self) -> list[int | None]:
        """The group member holding each prefix waiting for decode pages (`Prefix.owner`)."""
        with self._lock:
            return [p.owner for _, p, _ in self._ready if p is not None]

    def _ranks_of(self, prefix: Prefix) -> list[int] | None:
        """The ranks that may take `prefix`: those of the group member holding its pages, or any (None)."""
        if prefix.owner is None:
            return None
        return [r for r in range(self.decode.ranks) if self.decode.rank_processes(r) == {prefix.owner}]

    def _insert_ready(self) -> None:
        with self._lock:
            while self._ready and len(self.running) < self.max_batch:
                req, prefix, err = self._ready[0]
                if err is not None or req.aborted:
                    self._ready.popleft()
                    self._finish(req, "error" if err else "abort", err)
                    continue
                n = self._pages_for(req)
                if prefix.skip:
                    if not self._insert_after_cached(req, prefix, n):
                        break
                    continue
                rank = self._pick_rank(n, among=self._ranks_of(prefix))
                if rank is None:
                    break
                self._ready.popleft()
                req.pages = self.pages.allocator.allocate(n, rank)
                self.decode.insert(prefix, req.pages)
                req.draft, req.draft_q = prefix.draft, prefix.draft_q
                req.prompt_logprobs = prefix.prompt_logprobs
                self._start_running(req, prefix.first_token, prefix.logprobs)

    def _insert_after_cached(self, req: Request, prefix: Prefix, n: int) -> bool:
        """(Under the lock.) A prefix sent without its first `skip` pages: take pages with the cached prefix shared
        and write only the pages after it. If the chosen rank no longer holds those blocks (evicted since), prefill
        the request again, sending every page — or, prefilled in another process, prefill it here (colocated, its
        cached part shared). False: no rank has room yet."""
        hashes = self.pages.hashes(req.prompt_ids, req.salt)
        rank = self._pick_rank(n, hashes, among=self._ranks_of(prefix))
        local = self.prefill is None
        if local and len(self.running) + len(self.prefilling) >= self.max_batch:
            return False
        got = None if rank is None else self.pages.acquire(req.prompt_ids, n, rank, hashes)
        if got is None:
            return False
        self._ready.popleft()
        pages, cached = got
        held = cached // self.decode.cfg.page_size
        if held < prefix.skip and local:
            req.pages, req.cached_tokens, req.status = pages, cached, Status.PREFILLING
            req.chunks = self.decode.prefill_chunks(len(req.prompt_ids) - cached, cached)
            self.prefilling.append(req)
            self.prefill_stats["reprefilled"] += 1
            return True
        if held < prefix.skip:
            self.pages.release(pages)
            req.send_all = True
            self._in_prefill += 1
            self._to_prefill.put(req)
            self.prefill_stats["resent"] += 1
            return True
        # pages held beyond `skip` are shared cached pages: never written (the scratch page takes those rows)
        ids = [self.decode.scratch(rank)] * (held - prefix.skip) + pages[held:]
        self.decode.insert(prefix, ids)
        req.pages = pages
        req.draft, req.draft_q = prefix.draft, prefix.draft_q
        req.prompt_logprobs = prefix.prompt_logprobs
        self.prefill_stats["pages_not_sent"] += prefix.skip
        self._start_running(req, prefix.first_token, prefix.logprobs)
        return True

"""The scheduler's bookkeeping on its own (a fake engine: deterministic tokens, real page allocator).

Specification: a long-running scheduler keeps only requests in flight — 10,000 requests through it leave no
trace and memory stays flat; every page comes back.
"""

import collections
import dataclasses
import gc
import tracemalloc

import numpy as np
import pytest

from serving.api import Request
from serving.engine import DecodeOut, Engine, PrefillOut
from serving.config import EngineConfig, SchedulerConfig
from serving.pages import pages_for
from serving.sampling import SamplingParams
from serving.scheduler import Scheduler

V = 50


class FakeEngine:
    """The engine seam with arithmetic instead of a model: the next token is (last + 1) mod V."""

    name = "fake"
    ranks = 1

    def __init__(self):
        self.cfg = EngineConfig(page_size=4, num_pages=65, max_model_len=32, prefill_buckets=(2, 8),
                                decode_buckets=(1, 2, 4, 8), decode_steps=2)
        self.prefill_rows = collections.Counter()   # rows per prefill call

    abstract = False
    prefill_chunks = Engine.prefill_chunks
    page_table = Engine.page_table
    scratch = Engine.scratch
    rank_of = Engine.rank_of

    @property
    def pages_per_rank(self) -> int:
        return self.cfg.num_pages

    @property
    def max_batch(self) -> int:
        return self.cfg.max_batch

    def pages_needed(self, tokens: int) -> int:
        return pages_for(tokens, self.cfg.page_size)

    def prefill_batch(self, items) -> list[PrefillOut]:
        T = items[0][1][2]
        assert all(c[2] == T for _, c, _, _ in items) and len(items) <= self.cfg.rows_for(T)[-1]
        assert len({id(p) for _, _, p, _ in items}) == len(items)      # one chunk per request
        self.prefill_rows[len(items)] += 1
        out = []
        for prompt, chunk, pages, _ in items:
            assert len(pages) >= self.pages_needed(chunk[0] + chunk[1])
            out.append(PrefillOut((int(prompt[-1]) + 1) % V, 0, None))
        return out

    def dispatch(self, batch):
        """Like the engine: a row with src >= 0 starts from the previous dispatch's last token of row src."""
        S = self.cfg.decode_steps
        src = batch.src if batch.src is not None else [-1] * len(batch.tokens)
        start = [self._last[j] if j >= 0 else int(t) for t, j in zip(batch.tokens, src)]
        rows = [[(t + k) % V for k in range(1, S + 1)] for t in start]
        self._last = [r[-1] for r in rows]
        return lambda: DecodeOut(rows, [[1] * S] * len(rows), [[False] * S] * len(rows), None, None)

    def generate(self, batch) -> DecodeOut:
        return self.dispatch(batch)()


def _request(i: int) -> Request:
    return Request(id=f"q{i}", prompt_ids=np.array([i % V, (i + 1) % V], np.int32),
                   params=SamplingParams(max_tokens=3), seed=0, limit=3)


def test_ten_thousand_requests_leave_no_trace_and_memory_stays_flat():
    s = Scheduler(FakeEngine(), config=SchedulerConfig(max_batch=8))
    done, sizes = 0, {}
    tracemalloc.start()
    for i in range(10_000):
        s.add(_request(i))
        if len(s.requests) >= 64:                      # a bounded window in flight, as the batch job keeps
            while len(s.requests) > 16:
                for ev in s.step():
                    if ev.finished:
                        done += 1
                        assert ev.request.output_ids == [(i + 2) % V for i in range(int(ev.request.id[1:]),
                                                                                    int(ev.request.id[1:]) + 3)]
        if i + 1 in (1_000, 10_000):
            while s.has_work():
                done += sum(ev.finished for ev in s.step())
            gc.collect()      # collectable cycles are not residue; only what stays reachable counts
            sizes[i + 1] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert done == 10_000
    assert s.requests == {} and not s.running and not s.waiting and not s.prefilling
    a = s.pages.allocator
    a.check()
    assert a.free == a.total
    assert sizes[10_000] - sizes[1_000] < 64 * 1024, sizes   # flat: no per-request residue
    # 2-token prompts: up to 4 in one batched prefill call (the engine's rows for bucket 2)
    assert max(s.decode.prefill_rows) == 4 and sum(k * v for k, v in s.decode.prefill_rows.items()) == 10_000


def test_long_context_engines_prefill_in_longer_chunks():
    """Default chunk buckets grow with max_model_len (max_model_len / 8 within [128, 512]): a 2,048-token prompt on a
    4,096-token engine is 4 chunks, not 16; short-context engines and explicit buckets are unchanged."""
    chunks = lambda ec, n: Engine.prefill_chunks(type("E", (), {"cfg": ec})(), n)
    long = EngineConfig(max_model_len=4096)
    assert long.prefill_buckets == (16, 32, 64, 128, 256, 512)
    assert [c[1] for c in chunks(long, 2048)] == [512] * 4
    assert [c[1:] for c in chunks(long, 600)] == [(512, 512), (88, 128)]
    assert EngineConfig(max_model_len=2048).prefill_buckets[-1] == 256
    assert EngineConfig(max_model_len=1024).prefill_buckets == EngineConfig().prefill_buckets == (16, 32, 64, 128)
    assert EngineConfig(max_model_len=4096, prefill_buckets=(16, 128)).prefill_buckets == (16, 128)
    assert len(chunks(EngineConfig(max_model_len=1024), 2048)) == 16


def test_prefill_shapes_stay_within_the_token_cap():
    ec = EngineConfig(max_model_len=128, prefill_buckets=(32, 128), prefill_rows=(1, 4, 16))
    assert ec.prefill_shapes == ((1, 32), (4, 32), (1, 128))                    # cap: 256 tokens
    ec = EngineConfig(max_model_len=128, prefill_buckets=(32, 128), prefill_rows=(1, 4, 16), prefill_tokens=512)
    assert ec.prefill_shapes == ((1, 32), (4, 32), (16, 32), (1, 128), (4, 128))
    assert ec.rows_for(32) == (1, 4, 16)
    with pytest.raises(ValueError, match="prefill_rows"):
        EngineConfig(prefill_rows=(2, 4))
    with pytest.raises(ValueError, match="prefill_tokens"):
        EngineConfig(prefill_tokens=0)


def test_first_token_leaves_before_the_next_decode_dispatch_and_decode_is_never_starved():
    eng = FakeEngine()
    calls = []
    dispatch = eng.dispatch
    eng.dispatch = lambda batch: calls.append(len(batch.tokens)) or dispatch(batch)
    s = Scheduler(eng, config=SchedulerConfig(max_batch=8))
    a = _request(0)
    a.params, a.limit = SamplingParams(max_tokens=20), 20
    s.add(a)
    ev = s.step()                                   # a's prefill: its first token, no decode yet
    assert [(e.request.id, len(e.request.output_ids)) for e in ev] == [("q0", 1)] and calls == []
    s.step()
    assert calls == [1]                             # then the decode dispatch
    for i in range(1, 7):                           # an arrival before every step: prefill and decode alternate
        s.add(_request(i))
        ev = s.step()
        if i % 2:
            assert any(e.request.id == f"q{i}" and len(e.request.output_ids) == 1 for e in ev)
            assert len(calls) == (i + 1) // 2
        else:                                       # q{i} waits one step: this one decodes
            assert len(calls) == i // 2 + 1 and calls[-1] >= 2


def test_prefill_budget_grows_with_the_backlog_and_falls_back():
    """Each colocated step prefills the admitted prompts' tokens left / prefill_drain_steps, within [prefill_budget,
    prefill_budget_max]: a burst of long prompts drains in a few decode dispatches instead of one chunk per step
    (rows would sit prefilling while the decode batch runs part-empty), and a lone prompt stalls decode no longer
    than the floor allows."""
    cfg = SchedulerConfig(prefill_budget=8, prefill_budget_max=64, prefill_drain_steps=2)
    assert [cfg.step_budget(n) for n in (0, 8, 17, 100, 1000)] == [8, 8, 9, 50, 64]
    assert SchedulerConfig(prefill_budget=2048).step_budget(10**6) == 2048          # the offline default: fixed
    with pytest.raises(ValueError, match="prefill_drain_steps"):
        SchedulerConfig(prefill_drain_steps=0)

    def first_steps(config):
        eng = FakeEngine()
        tokens, batch = [], eng.prefill_batch
        eng.prefill_batch = lambda items: tokens.append(sum(c[1] for _, c, _, _ in items)) or batch(items)
        s = Scheduler(eng, config=config)
        for i in range(8):                          # 8 prompts of 24 tokens: 192 tokens, 3 chunks of 8 each
            s.add(Request(id=f"p{i}", prompt_ids=np.arange(24, dtype=np.int32) % V,
                          params=SamplingParams(max_tokens=3), seed=0, limit=3))
        per_step = []
        while s.has_work():
            n = len(tokens)
            s.step()
            per_step.append(sum(tokens[n:]))
        return per_step, s.prefill_stats["colocated_budget"]

    adaptive, last = first_steps(dataclasses.replace(cfg, max_batch=8))
    # 192 left: the cap; 128 left: 64; first tokens out, then the decode dispatch; 64 left: 32; then 16, ...
    assert adaptive[:5] == [64, 64, 0, 32, 16], adaptive
    assert sum(adaptive) == 192 and last == 8                              # drained: back to the floor
    fixed, _ = first_steps(SchedulerConfig(max_batch=8, prefill_budget=8, prefill_budget_max=8))
    assert fixed[0] == 8 and sum(fixed) == 192 and len(fixed) > 2 * len(adaptive)

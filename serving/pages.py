"""Host-side page bookkeeping of the paged latent cache: the reference-counted `PageAllocator` the scheduler owns.

The device layout the pages live in is `model.paged_cache.PagedCache`; an engine holds the cache array and moves
pages in and out (`Engine.read_pages` / `write_pages`), but never decides which pages a request gets.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING

import numpy as np

from model.paged_cache import SCRATCH_PAGE

if TYPE_CHECKING:
    from serving.engine import Engine

class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Reference-counted pages of R pools (`ranks`) of `num_pages` each, as global ids r * num_pages + i; local
    page 0 of every pool is its scratch page. Thread-safe.

    Prefix caching (`serving.prefix_cache`): a page whose content is a full block of known tokens can be
    `register`ed under the block's chained hash. When its last holder releases it, it is not freed but *cached*:
    kept, unreferenced, in its rank's LRU, where `allocate_prefix` can find it (`share`: reference-counted) and
    `allocate` evicts it (oldest first) when the free list runs dry; `on_evict([(page, hash)])` is then called
    before the page is handed out (to spill it to a slower tier).

    Invariant: free + used + leased + cached == total (leased = held for a KV transfer that has not been
    acknowledged; cached = unreferenced pages kept for their content).
    """

    def __init__(self, num_pages: int, ranks: int = 1):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least one page besides the scratch page")
        if ranks < 1:
            raise ValueError(f"ranks={ranks} must be >= 1")
        self.pages_per_rank, self.ranks = num_pages, ranks
        self.total = ranks * (num_pages - 1)
        # pop() hands out low page ids first
        self._free = [list(range(r * num_pages + num_pages - 1, r * num_pages, -1)) for r in range(ranks)]
        self._ref = np.zeros(ranks * num_pages, np.int32)
        self._leased: set[int] = set()
        self._lock = threading.Lock()
        self._hash: dict[int, int] = {}                        # page -> hash of the block it holds
        self._index: dict[tuple[int, int], int] = {}           # (rank, hash) -> page
        self._lru: list[collections.OrderedDict[int, None]] = [collections.OrderedDict() for _ in range(ranks)]
        self.on_evict = None                                   # callable([(page, hash)]) or None
        self.evictions = 0
        # cache events for a KV-aware router ("stored" / "removed", hash), when someone drains them (a worker)
        self.events: list[tuple[str, int]] | None = None

    @property
    def free(self) -> int:
        return sum(len(f) for f in self._free)

    def free_in(self, rank: int) -> int:
        """Pages `allocate` can hand out on `rank`: free ones and unreferenced cached ones (evicted on demand)."""
        return len(self._free[rank]) + len(self._lru[rank])

    @property
    def leased(self) -> int:
        return len(self._leased)

    @property
    def used(self) -> int:
        return int((self._ref > 0).sum()) - len(self._leased)

    @property
    def cached(self) -> int:
        """Unreferenced pages kept for their content (reusable by a prefix hit, evictable)."""
        return sum(len(l) for l in self._lru)

    def rank_of(self, page: int) -> int:
        return page // self.pages_per_rank

    def scratch(self, rank: int = 0) -> int:
        return rank * self.pages_per_rank + SCRATCH_PAGE

    def can_allocate(self, n: int, rank: int = 0) -> bool:
        return n <= self.free_in(rank)

    def _take(self, n: int, rank: int) -> tuple[list[int], list[tuple[int, int]]]:
        """n pages off rank's free list, evicting the oldest cached pages when it runs dry (under the lock)."""
        free, lru, evicted = self._free[rank], self._lru[rank], []
        while len(free) < n:
            page, _ = lru.popitem(last=False)
            h = self._hash.pop(page)
            del self._index[rank, h]
            free.append(page)
            evicted.append((page, h))
            if self.events is not None:
                self.events.append(("removed", h))
        pages = [free.pop() for _ in range(n)]
        self._ref[pages] = 1
        self.evictions += len(evicted)
        return pages, evicted

    def _spill(self, evicted: list[tuple[int, int]]) -> None:
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)   # before the caller writes into the pages

    def allocate(self, n: int, rank: int = 0) -> list[int]:
        with self._lock:
            if n > self.free_in(rank):
                raise OutOfPages(f"asked for {n} pages on rank {rank}, {len(self._free[rank])} free and "
                                 f"{len(self._lru[rank])} cached of {self.pages_per_rank - 1}")
            pages, evicted = self._take(n, rank)
        self._spill(evicted)
        return pages

    def match(self, hashes, rank: int = 0) -> int:
        """How many leading blocks of `hashes` rank holds."""
        n = 0
        for h in hashes:
            if (rank, h) not in self._index:
                break
            n += 1
        return n

    def allocate_prefix(self, hashes, n: int, rank: int = 0) -> tuple[list[int], int] | None:
        """n pages for a request whose leading blocks have `hashes`: the cached ones shared (reference counted),
        the rest newly allocated. Returns (pages, blocks shared) or None when rank has no room."""
        with self._lock:
            m = min(self.match(hashes, rank), n)
            shared = [self._index[rank, h] for h in hashes[:m]]
            resident = sum(1 for p in shared if self._ref[p] == 0)   # cached pages the share takes off the LRU
            if n - m > self.free_in(rank) - resident:
                return None
            for p in shared:
                self._share(p)
            pages, evicted = self._take(n - m, rank)
        self._spill(evicted)
        return shared + pages, m

    def _share(self, page: int) -> None:
        if self._ref[page] == 0:
            self._lru[self.rank_of(page)].pop(page)
        self._ref[page] += 1

    def share(self, pages: list[int]) -> None:
        """One more holder of each page (an allocated or a cached one)."""
        with self._lock:
            for p in pages:
                if p % self.pages_per_rank == SCRATCH_PAGE or (self._ref[p] == 0 and p not in self._hash):
                    raise ValueError(f"page {p} shared but neither allocated nor cached")
                self._share(p)

    def register(self, pages: list[int], hashes: list[int]) -> int:
        """Record that page i holds the block with hashes[i] (pages held by the caller). A block already cached
        on the rank (another copy) or a page already registered is skipped. Returns how many were recorded."""
        n = 0
        with self._lock:
            for p, h in zip(pages, hashes):
                r = self.rank_of(p)
                if self._ref[p] <= 0:
                    raise ValueError(f"page {p} registered but not held")
                if p in self._hash or (r, h) in self._index:
                    continue
                self._hash[p] = h
                self._index[r, h] = p
                n += 1
                if self.events is not None:
                    self.events.append(("stored", h))
        return n

    def release(self, pages: list[int]) -> None:
        """Drop one holder of each page. A request's pages go last-first, so its cached tail is older in the LRU
        than its head and is evicted first (a chained prefix is useless without its first pages)."""
        with self._lock:
            for p in reversed(pages):
                if p % self.pages_per_rank == SCRATCH_PAGE or self._ref[p] <= 0:
                    raise ValueError(f"page {p} released but not allocated")
                self._ref[p] -= 1
                if self._ref[p] == 0:
                    self._leased.discard(p)
                    if p in self._hash:
                        self._lru[self.rank_of(p)][p] = None    # most recently used at the end
                    else:
                        self._free[self.rank_of(p)].append(p)

    def drain_events(self) -> dict[str, list[int]]:
        """Cache events since the last drain, netted: {"stored": [...], "removed": [...]} (a hash stored and then
        removed, or the reverse, reports only its final state)."""
        with self._lock:
            evs, self.events = self.events or [], ([] if self.events is not None else None)
        last: dict[int, str] = {}
        for kind, h in evs:
            last[h] = kind
        return {"stored": [h for h, k in last.items() if k == "stored"],
                "removed": [h for h, k in last.items() if k == "removed"]}

    def lease(self, pages: list[int]) -> None:
        """Mark allocated pages as held for a transfer (counted as leased, not used)."""
        with self._lock:
            self._leased.update(pages)

    def check(self) -> None:
        with self._lock:
            assert self.free + self.used + self.leased + self.cached == self.total, (
                self.free, self.used, self.leased, self.cached, self.total)
            flat = [p for f in self._free for p in f]
            assert len(set(flat)) == len(flat)
            assert all(self.rank_of(p) == r for r, f in enumerate(self._free) for p in f)
            assert all(self._ref[p] == 0 and p in self._hash and self.rank_of(p) == r
                       for r, l in enumerate(self._lru) for p in l)
            assert not set(flat) & set(self._hash), "a free page is still registered"
            assert all(self._index[self.rank_of(p), h] == p for p, h in self._hash.items())
            assert len(self._index) == len(self._hash)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class PagePool:
    """The scheduler side's pages of one engine: which pages a request gets (the allocator) and which of them hold
    a cached prefix (the prefix cache, with its host/disk tiers). The engine only moves pages in and out
    (`Engine.read_pages` / `write_pages`); it never decides who owns one."""

    def __init__(self, engine: "Engine"):
        from serving.prefix_cache import PrefixCache

        cfg = engine.cfg
        self.engine_name = engine.name
        self.allocator = PageAllocator(cfg.num_pages, ranks=engine.ranks)
        self.prefix_cache = None
        if cfg.prefix_caching and not engine.abstract:
            self.prefix_cache = PrefixCache(engine, self.allocator, host_blocks=cfg.host_cache_pages,
                                            disk_blocks=cfg.disk_cache_pages, disk_dir=cfg.disk_cache_dir,
                                            fingerprint=engine.fingerprint())

    def hashes(self, prompt, salt: str | None = None) -> list[int] | None:
        """The prompt's block hashes (seeded by the request's `cache_salt`) when prefix caching is on (else None)."""
        return self.prefix_cache.hashes(prompt, salt=salt) if self.prefix_cache is not None else None

    def acquire(self, prompt, n_pages: int, rank: int = 0, hashes: list[int] | None = None,
                salt: str | None = None) -> tuple[list[int], int] | None:
        """n_pages pages for a request with `prompt`, its cached prefix (if prefix caching is on, of the same
        `salt`) already in the first ones: (pages, cached tokens), or None when the rank has no room."""
        if self.prefix_cache is not None:
            return self.prefix_cache.acquire(prompt, n_pages, rank, hashes, salt)
        if not self.allocator.can_allocate(n_pages, rank):
            return None
        return self.allocator.allocate(n_pages, rank), 0

    def cache_prefix(self, pages: list[int], tokens, n_valid: int, salt: str | None = None) -> None:
        """Offer the full blocks among the first `n_valid` positions (KV written for `tokens`) to the cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.register(pages, tokens, n_valid, salt)

    def release(self, pages: list[int]) -> None:
        self.allocator.release(pages)

    def stats(self) -> dict[str, int]:
        a = self.allocator
        return {"free": a.free, "used": a.used, "leased": a.leased, "cached": a.cached, "total": a.total}

    def close(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.close()

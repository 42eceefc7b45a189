"""Paged latent KV cache: the device layout (`PagedCache`) and the host-side page allocator (`PageAllocator`).

Device state: one array `[layers, R * pages_per_rank, page_size, C]` per engine (C = kv_lora_rank +
qk_rope_head_dim; MLA's latent has no head axis, so TP ranks share it). A request owns a list of pages; its page
table maps logical page i (positions [i*Z, (i+1)*Z)) to a physical page.

Data-parallel attention: with R > 1 attention ranks (the mesh axes the rules map "pages" to, e.g. dp x ep), the
page axis is split over them: rank r holds global pages [r * pages_per_rank, (r + 1) * pages_per_rank), and each
request lives on one rank (its rows of a decode batch sit in that rank's slice of the batch). Reads and writes run
inside `shard_map` on the local pages, so the cache is never gathered across ranks.

Local page 0 of every rank is its *scratch page*: never handed out; padding rows and unused page-table entries
point at it, so writes of padded tokens land there and no valid request ever reads it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.paged_attention import paged_mla_decode

SCRATCH_PAGE = 0


# ---- FP8 latent rows: a uint8 cache of C e4m3 codes + the token's f32 scale (4 bytes) per row -------------------
FP8_SCALE_BYTES = 4
_E4M3_MAX = 448.0


def is_fp8(state) -> bool:
    return jnp.dtype(state.dtype) == jnp.uint8


def encode_fp8_rows(kv_TC) -> jax.Array:
    """[..., C] latents -> [..., C + 4] bytes: e4m3 codes of kv / s, then s = amax / 448 (f32, per token)."""
    x = kv_TC.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / _E4M3_MAX
    s = jnp.where(s > 0, s, 1.0)
    codes = jnp.clip(x / s, -_E4M3_MAX, _E4M3_MAX).astype(jnp.float8_e4m3fn)
    sb = jax.lax.bitcast_convert_type(s[..., 0], jnp.uint8)               # [..., 4]
    return jnp.concatenate([jax.lax.bitcast_convert_type(codes, jnp.uint8), sb], axis=-1)


def decode_fp8_rows(raw, dtype) -> jax.Array:
    """Inverse of `encode_fp8_rows`: [..., C + 4] bytes -> [..., C] in `dtype`."""
    codes = jax.lax.bitcast_convert_type(raw[..., :-FP8_SCALE_BYTES], jnp.float8_e4m3fn).astype(jnp.float32)
    s = jax.lax.bitcast_convert_type(raw[..., -FP8_SCALE_BYTES:], jnp.float32)
    return (codes * s[..., None]).astype(dtype)


def read_rows(raw, dtype):
    """Cache rows as latents in `dtype` (dequantized when the cache is FP8)."""
    return decode_fp8_rows(raw, dtype) if jnp.dtype(raw.dtype) == jnp.uint8 else raw


def _write_and_gather(state, layer: int, kv_BTC, positions_BT, page_table_BP, valid_BT):
    """On one pool (local page ids): write the new tokens' latents, gather the rows' page windows."""
    _, _, Z, Cs = state.shape
    B, Pw = page_table_BP.shape
    state = _write(state, layer, kv_BTC, positions_BT, page_table_BP, valid_BT)
    kv_BSC = read_rows(state[layer][page_table_BP].reshape(B, Pw * Z, Cs), kv_BTC.dtype)
    mask_BTS = jnp.arange(Pw * Z)[None, None, :] <= positions_BT[:, :, None]
    return state, kv_BSC, mask_BTS


def _write(state, layer: int, kv_BTC, positions_BT, page_table_BP, valid_BT):
    Z = state.shape[2]
    Pw = page_table_BP.shape[1]
    logical_BT = positions_BT // Z
    in_range_BT = valid_BT & (logical_BT < Pw) & (positions_BT >= 0)
    page_BT = jnp.take_along_axis(page_table_BP, jnp.clip(logical_BT, 0, Pw - 1), axis=1)
    page_BT = jnp.where(in_range_BT, page_BT, SCRATCH_PAGE)
    rows = encode_fp8_rows(kv_BTC) if is_fp8(state) else kv_BTC.astype(state.dtype)
    return state.at[layer, page_BT, positions_BT % Z].set(rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """Cache layout for `DeepseekV3.forward`: rows b write/read through `page_table_BP[b]` (global page ids).

    valid_BT marks real tokens; padded tokens write to a scratch page. With `axes` (data-parallel attention),
    `mesh` and `pages_per_rank`, the state's page axis is split over `axes`: a batch of R x b rows puts rank r's
    rows in slice r (each runs on its own pages); a batch that does not split (one prefill row) is computed by
    every rank and written by the rank owning its pages. `kernel`: decode attention through the paged Pallas
    kernel (`pallas_kernels.paged_attention`, "pallas" / "pallas_interpret") instead of a gathered window."""

    page_table_BP: jax.Array
    valid_BT: jax.Array
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))
    axes: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    pages_per_rank: int = dataclasses.field(default=0, metadata=dict(static=True))
    kernel: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    # prefill: attend block by block over only the pages the rows have (pages per block; 0 = one gathered window)
    block_pages: int = dataclasses.field(default=0, metadata=dict(static=True))
    # a batch of R x b rows is R slices, one per rank (decode); False: rows of any ranks (batched prefill)
    split_rows: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def ranks(self) -> int:
        return 1 if not self.axes else int(np.prod([self.mesh.shape[a] for a in self.axes]))

    def _split(self, B: int) -> bool:
        return self.split_rows and B % self.ranks == 0

    def _shard(self, body, state, *row_args, split: bool, out_rows: int):
        ax = self.axes
        row = P(ax) if split else P()
        return jax.shard_map(body, mesh=self.mesh, in_specs=(P(None, ax),) + (row,) * len(row_args),
                             out_specs=(P(None, ax),) + (row,) * out_rows, check_vma=False)(state, *row_args)

    def update(self, state, layer: int, kv_BTC, positions_BT):
        if self.ranks == 1:
            return _write_and_gather(state, layer, kv_BTC, positions_BT, self.page_table_BP, self.valid_BT)
        ppr, ax = self.pages_per_rank, self.axes
        split = self._split(self.page_table_BP.shape[0])

        def body(st, pt, valid, kv, pos):
            r = jax.lax.axis_index(ax)
            if split:
                return _write_and_gather(st, layer, kv, pos, pt - r * ppr, valid)
            owner_B = (pt[:, 0] // ppr) == r            # one row: computed everywhere, written by its owner
            local = jnp.where(owner_B[:, None], pt - r * ppr, SCRATCH_PAGE)
            st, kv_BSC, mask = _write_and_gather(st, layer, kv, pos, local, valid & owner_B[:, None])
            kv_BSC = jax.lax.psum(jnp.where(owner_B[:, None, None], kv_BSC, jnp.zeros((), kv_BSC.dtype)), ax)
            return st, kv_BSC, mask

        return self._shard(body, state, self.page_table_BP, self.valid_BT, kv_BTC, positions_BT, split=split,
                           out_rows=2)

    # ---- blockwise prefill: key blocks read page by page, only as far as the rows reach --------------------------
    @property
    def blockwise(self) -> bool:
        return self.block_pages > 0 and self.ranks == 1

    def read_block(self, state, layer: int, j, dtype=None):
        """Key block j: the latents of page-table columns [j * block_pages, (j + 1) * block_pages) of every row,
        [B, block_pages * Z, C] (columns past the table read the scratch page; positions mask them)."""
        B, Pw = self.page_table_BP.shape
        k = self.block_pages
        cols = j * k + jnp.arange(k)
        pages = jnp.where(cols[None, :] < Pw, jnp.take(self.page_table_BP, jnp.minimum(cols, Pw - 1), axis=1),
                          SCRATCH_PAGE)
        Z, C = state.shape[2:]
        return read_rows(state[layer][pages].reshape(B, k * Z, C), dtype or jnp.bfloat16)

    # ---- the paged-kernel path (absorbed decode) ----------------------------------------------------------------
    def write(self, state, layer: int, kv_BTC, positions_BT):
        """Only write the new tokens' latents (the kernel reads the pages itself)."""
        if self.ranks == 1:
            return _write(state, layer, kv_BTC, positions_BT, self.page_table_BP, self.valid_BT)
        ppr, ax = self.pages_per_rank, self.axes

        def body(st, pt, valid, kv, pos):
            return (_write(st, layer, kv, pos, pt - jax.lax.axis_index(ax) * ppr, valid),)

        return self._shard(body, state, self.page_table_BP, self.valid_BT, kv_BTC, positions_BT, split=True,
                           out_rows=0)[0]

    def attend_absorbed(self, state, layer: int, q_lat_BTHL, q_rope_BTHR, positions_BT, scale: float):
        """softmax(scale * (q_lat . c + q_rope . k_rope)) @ c over each query's positions <= its own, read page by
        page by the paged kernel: float32 [B, T, H, L]."""
        B, T, H, L = q_lat_BTHL.shape
        R = q_rope_BTHR.shape[-1]

        if is_fp8(state) and self.kernel:
            raise NotImplementedError("the paged Pallas kernel reads bf16/f32 caches; an FP8 cache decodes "
                                      "through attention_impl='xla'")

        def run(st, pt, ql, qr, pos):   # one query row per (b, t): the row's page table, length pos + 1
            o = paged_mla_decode(ql.reshape(-1, H, L), qr.reshape(-1, H, R), st, layer,
                                 jnp.repeat(pt, T, axis=0), (pos + 1).reshape(-1), scale, impl=self.kernel)
            return o.reshape(pos.shape[0], T, H, L)

        if self.ranks == 1:
            return run(state, self.page_table_BP, q_lat_BTHL, q_rope_BTHR, positions_BT)
        ppr, ax = self.pages_per_rank, self.axes

        def body(st, pt, ql, qr, pos):
            return run(st, pt - jax.lax.axis_index(ax) * ppr, ql, qr, pos)

        return jax.shard_map(body, mesh=self.mesh, in_specs=(P(None, ax), P(ax), P(ax), P(ax), P(ax)),
                             out_specs=P(ax), check_vma=False)(state, self.page_table_BP, q_lat_BTHL, q_rope_BTHR,
                                                               positions_BT)


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

"""Prefix caching over an engine's paged latent cache, with host-memory and disk tiers behind it.

Blocks: a page holding page_size tokens at positions [i*Z, (i+1)*Z) is keyed by the *chained* hash of its tokens
(`block_hashes`: blake2b-64 of the previous block's hash and this block's token ids), so a key names the whole
prefix up to and including the block: two requests share block i only if their first (i+1)*Z tokens agree. Only
full blocks are cached and shared, and a request always prefills at least its last prompt token (it needs the
logits), so shared pages are never written: no copy-on-write is needed (vLLM v1 makes the same choice).
With MTP the MTP layer's cache at the block's last position depends on the token after the block, so that token
is part of the key.

Tiers (each bounded, LRU):
* device: pages the `PageAllocator` keeps after their last holder releases them (`cached`), found by
  `allocate_prefix`, evicted by `allocate` when the free list runs dry;
* host: an evicted page's rows are read out (one extract dispatch for the evicted batch) and copied to numpy on
  an offload thread, so the step that evicted does not wait for the copy;
* disk: blocks the host tier evicts, one file per block under `disk_dir/<model fingerprint>-<engine>/` with a header
  holding the block hash, dtype, shape and a blake2b checksum of the payload. A block whose checksum does not
  match (or whose file is short or unreadable) is never served: it is deleted, counted (`corrupt`), and the
  request recomputes from there.
A hit in a slower tier is written back into freshly allocated device pages (one insert dispatch) and registered
there again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from serving.engine import Engine
    from serving.pages import PageAllocator

log = logging.getLogger(__name__)


def block_hashes(tokens, page_size: int, n_blocks: int, *, lookahead: int = 0, salt: str | None = None
                 ) -> list[int]:
    """Chained 64-bit hashes of the first `n_blocks` full blocks of `tokens`; with `lookahead` the key of block i
    also covers the next `lookahead` tokens (which must exist). A `salt` (a request's `cache_salt`) seeds the chain:
    blocks of different salts never share a key, so tenants never hit each other's cached prefixes."""
    toks = np.asarray(tokens, np.int64)
    out, h = [], 0
    if salt:
        h = int.from_bytes(hashlib.blake2b(b"cache_salt:" + salt.encode(), digest_size=8).digest(), "little")
    for i in range(n_blocks):
        d = hashlib.blake2b(h.to_bytes(8, "little"), digest_size=8)
        d.update(toks[i * page_size:(i + 1) * page_size + lookahead].tobytes())
        h = int.from_bytes(d.digest(), "little")
        out.append(h)
    return out


class CorruptBlock(Exception):
    pass


class HostTier:
    """Blocks in host memory (numpy [layers, Z, C] each), LRU, at most `capacity` blocks."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blocks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def get(self, h: int) -> np.ndarray | None:
        b = self._blocks.get(h)
        if b is not None:
            self._blocks.move_to_end(h)
        return b

    def put(self, h: int, block: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Store a block; returns the blocks pushed out (oldest first) to go to the next tier."""
        if h in self._blocks:
            self._blocks.move_to_end(h)
            return []
        self._blocks[h] = block
        self.bytes += block.nbytes
        out = []
        while len(self._blocks) > self.capacity:
            oh, ob = self._blocks.popitem(last=False)
            self.bytes -= ob.nbytes
            out.append((oh, ob))
        return out


class DiskTier:
    """Blocks as files `<hash:016x>.kvb` under `root`, LRU, at most `capacity` blocks. File layout:
    MAGIC (8) | block hash u64 | header length u32 | blake2b-256 of the payload (32) | JSON {dtype, shape} |
    payload. Files already in `root` (an earlier run of the same model) are indexed at start, oldest first."""

    MAGIC = b"TNDMKV01"
    _HEAD = struct.Struct("<8sQI32s")

    def __init__(self, root: str, capacity: int):
        self.root, self.capacity = root, capacity
        os.makedirs(root, exist_ok=True)
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()   # hash -> bytes on disk
        found = []
        for name in os.listdir(root):
            if name.endswith(".kvb"):
                try:
                    found.append((os.path.getmtime(os.path.join(root, name)), int(name[:-4], 16),
                                  os.path.getsize(os.path.join(root, name))))
                except (OSError, ValueError):
                    continue
        for _, h, size in sorted(found):
            self._files[h] = size
        self._trim()

    def _path(self, h: int) -> str:
        return os.path.join(self.root, f"{h:016x}.kvb")

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, h: int) -> bool:
        return h in self._files

    @property
    def bytes(self) -> int:
        return sum(self._files.values())

    def _trim(self) -> int:
        n = 0
        while len(self._files) > self.capacity:
            h, _ = self._files.popitem(last=False)
            try:
                os.remove(self._path(h))
            except OSError:
                pass
            n += 1
        return n

    def put(self, h: int, block: np.ndarray) -> int:
        """Write a block (atomically: temp file + rename); returns how many old blocks were dropped to fit."""
        payload = np.ascontiguousarray(block).tobytes()
        meta = json.dumps({"dtype": block.dtype.name, "shape": list(block.shape)}).encode()
        head = self._HEAD.pack(self.MAGIC, h, len(meta), hashlib.blake2b(payload, digest_size=32).digest())
        tmp = self._path(h) + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(head + meta + payload)
        os.replace(tmp, self._path(h))
        self._files[h] = len(head) + len(meta) + len(payload)
        self._files.move_to_end(h)
        return self._trim()

    def get(self, h: int) -> np.ndarray | None:
        """The block, None if absent; CorruptBlock (and the file deleted) if it fails its checks."""
        if h not in self._files:
            return None
        try:
            with open(self._path(h), "rb") as f:
                raw = f.read()
        except FileNotFoundError:   # removed behind our back: a miss, not corruption
            self._files.pop(h, None)
            return None
        try:
            magic, fh, n_meta, digest = self._HEAD.unpack_from(raw)
            if magic != self.MAGIC or fh != h:
                raise CorruptBlock(f"bad header (magic {magic!r}, hash {fh:016x})")
            start = self._HEAD.size + n_meta
            meta = json.loads(raw[self._HEAD.size:start])
            payload = raw[start:]
            if hashlib.blake2b(payload, digest_size=32).digest() != digest:
                raise CorruptBlock("payload checksum mismatch")
            dtype = _dtype(meta["dtype"])
            block = np.frombuffer(payload, dtype).reshape(meta["shape"])
        except CorruptBlock as e:
            self.drop(h)
            raise CorruptBlock(f"KV block {h:016x} on disk: {e}") from None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            self.drop(h)
            raise CorruptBlock(f"KV block {h:016x} on disk unreadable: {type(e).__name__}: {e}") from None
        self._files.move_to_end(h)
        return block

    def drop(self, h: int) -> None:
        self._files.pop(h, None)
        try:
            os.remove(self._path(h))
        except OSError:
            pass


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes   # bfloat16 / float8 names (a jax dependency)
        return np.dtype(getattr(ml_dtypes, name))


class PrefixCache:
    """An engine's prefix cache, on the scheduler side: device pages (through the pool's `PageAllocator`, read and
    written through the engine's page I/O) plus optional host and disk tiers.

    `acquire(tokens, n_pages, rank)` gives a request its pages with the cached prefix already in them and says how
    many tokens that covers; `register(pages, tokens, n_valid)` records the full blocks a request has written.
    Counters in `stats()`: blocks looked up, hits per tier, evictions, bytes per tier, corrupt blocks."""

    def __init__(self, engine: "Engine", allocator: "PageAllocator", *, host_blocks: int = 0, disk_blocks: int = 0,
                 disk_dir: str | None = None, fingerprint: str = ""):
        self.engine = engine                     # page I/O only: read_pages / write_pages
        self.alloc = allocator
        self.page_size = engine.cfg.page_size
        self.lookahead = 1 if engine.cfg.mtp else 0
        self.host = HostTier(host_blocks) if host_blocks > 0 else None
        self.disk = None
        if disk_blocks > 0:
            if not disk_dir:
                raise ValueError("a disk KV tier needs a directory (EngineConfig.disk_cache_dir / --kv_disk_dir)")
            if self.host is None:
                raise ValueError("the disk KV tier holds blocks the host tier evicts: give host_cache_pages > 0")
            # one directory per model and engine: two engines never share (and fight over) one LRU
            self.disk = DiskTier(os.path.join(disk_dir, f"{fingerprint or 'model'}-{engine.name}"), disk_blocks)
        self.counts: collections.Counter = collections.Counter()
        # hash -> (parent hash, the block's tokens), kept only for a KV-event consumer that must name the tokens
        # (Dynamo's router hashes tokens itself): `describe_blocks(True)`; an LRU bounded by a few times the pool
        self.block_meta: collections.OrderedDict[int, tuple[int | None, list[int]]] | None = None
        self._lock = threading.Lock()            # tiers and pending
        self._pending: dict[int, tuple[object, int]] = {}   # hash -> (device array of an evicted batch, index)
        if self.host is not None:
            self.alloc.on_evict = self._offload
            self._queue: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._offload_loop, name=f"{engine.name}-kv-offload", daemon=True)
            self._thread.start()

    def describe_blocks(self, on: bool = True) -> None:
        """Keep each registered block's parent hash and tokens (`block_meta`) for KV events that carry tokens."""
        self.block_meta = collections.OrderedDict() if on else None

    def _describe(self, tokens, hashes: list[int]) -> None:
        meta = self.block_meta
        if meta is None:
            return
        ps, toks = self.page_size, np.asarray(tokens)
        for i, h in enumerate(hashes):
            meta[h] = (hashes[i - 1] if i else None, toks[i * ps:(i + 1) * ps].tolist())
            meta.move_to_end(h)
        while len(meta) > 4 * self.alloc.total + 64:
            meta.popitem(last=False)

    # ---- the request path -------------------------------------------------------------------------------------------
    def usable_blocks(self, n_tokens: int) -> int:
        """Blocks of an n-token prompt a request may take from the cache: full ones, leaving at least the last
        token to prefill (and, with MTP, the token after each block known)."""
        return max(0, (n_tokens - 1) // self.page_size)

    def hashes(self, tokens, n_blocks: int | None = None, salt: str | None = None) -> list[int]:
        n = self.usable_blocks(len(tokens)) if n_blocks is None else n_blocks
        return block_hashes(tokens, self.page_size, n, lookahead=self.lookahead, salt=salt)

    def match(self, hashes: list[int], rank: int) -> int:
        return self.alloc.match(hashes, rank)

    def acquire(self, tokens, n_pages: int, rank: int = 0, hashes: list[int] | None = None,
                salt: str | None = None) -> tuple[list[int], int] | None:
        """n_pages pages for a request with prompt `tokens`: its cached leading blocks shared (device) or loaded
        back (host/disk), the rest fresh. Returns (pages, cached tokens) or None when rank has no room."""
        hashes = self.hashes(tokens, salt=salt) if hashes is None else hashes
        m0 = self.alloc.match(hashes, rank)
        if not self.alloc.can_allocate(n_pages - m0, rank):
            return None
        # read the slower tiers' blocks before allocating: the allocation's evictions push blocks down the tiers
        blocks = self._gather(hashes[m0:n_pages]) if self.host is not None else []
        got = self.alloc.allocate_prefix(hashes, n_pages, rank)
        if got is None:
            return None
        pages, m = got
        blocks = blocks[m - m0:] if m >= m0 else []   # (the scheduler's thread is the only one allocating)
        if blocks:
            k = len(blocks)
            self.engine.write_pages(pages[m:m + k], np.stack([b for b, _ in blocks], axis=1))
            self._describe(tokens, hashes[:m + k])
            self.alloc.register(pages[m:m + k], hashes[m:m + k])
        with self._lock:
            self.counts["queries"] += 1
            self.counts["blocks_queried"] += len(hashes)
            self.counts["hits_device"] += m
            for _, tier in blocks:
                self.counts[f"hits_{tier}"] += 1
            self.counts["requests_hit"] += int(m + len(blocks) > 0)
        return pages, (m + len(blocks)) * self.page_size

    def register(self, pages: list[int], tokens, n_valid: int, salt: str | None = None) -> int:
        """Cache the full blocks among the first `n_valid` positions of `pages` (KV written for `tokens`)."""
        n = min(n_valid // self.page_size, (len(tokens) - self.lookahead) // self.page_size, len(pages))
        if n <= 0:
            return 0
        hashes = self.hashes(tokens, n, salt)
        self._describe(tokens, hashes)
        return self.alloc.register(pages[:n], hashes)

    # ---- tiers --------------------------------------------------------------------------------------------------------
    def _lookup(self, h: int) -> tuple[np.ndarray | None, str | None]:
        with self._lock:
            if h in self._pending:
                data, i = self._pending[h]
                return np.asarray(data)[:, i], "host"
            b = self.host.get(h)
            if b is not None:
                return b, "host"
            if self.disk is None:
                return None, None
            try:
                b = self.disk.get(h)
            except CorruptBlock as e:
                self.counts["corrupt"] += 1
                log.warning("%s; recomputing from there", e)
                return None, None
            return b, ("disk" if b is not None else None)

    def _gather(self, hashes: list[int]) -> list[tuple[np.ndarray, str]]:
        """The leading run of `hashes` found in the host or disk tier: [(block, tier)]."""
        out = []
        for h in hashes:
            b, tier = self._lookup(h)
            if b is None:
                break
            out.append((b, tier))
        return out

    def _offload(self, evicted: list[tuple[int, int]]) -> None:
        """Allocator eviction hook (before the pages are reused): dispatch one read of the evicted pages that are
        not already in a slower tier; the offload thread copies it to host memory."""
        with self._lock:
            self.counts["evicted_device"] += len(evicted)
            todo = [(p, h) for p, h in evicted if h not in self._pending and h not in self.host
                    and (self.disk is None or h not in self.disk)]
        if not todo:
            return
        big = self.engine.cfg.transfer_buckets[-1]
        for s in range(0, len(todo), big):
            part = todo[s:s + big]
            data = self.engine.read_pages([p for p, _ in part])   # async dispatch, ordered before later writes
            with self._lock:
                for i, (_, h) in enumerate(part):
                    self._pending[h] = (data, i)
            self._queue.put(([h for _, h in part], data))

    def _offload_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                hashes, data = item
                host = np.asarray(data)                 # the device -> host copy, off the scheduler's thread
                for i, h in enumerate(hashes):
                    with self._lock:
                        out = self.host.put(h, np.ascontiguousarray(host[:, i]))
                        self._pending.pop(h, None)
                        self.counts["offloaded_host"] += 1
                        for oh, ob in out:
                            self.counts["evicted_host"] += 1
                            if self.disk is not None:
                                self.counts["evicted_disk"] += self.disk.put(oh, ob)
                                self.counts["spilled_disk"] += 1
            except Exception:   # never kill the thread: a block that failed to offload is simply not cached
                log.exception("KV offload failed")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every evicted block has reached its tier (tests, shutdown)."""
        if self.host is not None:
            self._queue.join()

    def close(self) -> None:
        if self.host is not None:
            self.flush()
            self._queue.put(None)
            self._thread.join(timeout=10)

    # ---- metrics ------------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            c = dict(self.counts)
            q = max(1, c.get("blocks_queried", 0))
            out = {k: int(v) for k, v in c.items()}
            out.update(
                device_blocks=self.alloc.cached, evictions=self.alloc.evictions,
                hit_rate_device=c.get("hits_device", 0) / q, hit_rate_host=c.get("hits_host", 0) / q,
                hit_rate_disk=c.get("hits_disk", 0) / q,
                host_blocks=len(self.host) if self.host is not None else 0,
                host_bytes=self.host.bytes if self.host is not None else 0,
                disk_blocks=len(self.disk) if self.disk is not None else 0,
                disk_bytes=self.disk.bytes if self.disk is not None else 0)
        out["device_bytes"] = out["device_blocks"] * self.engine.page_bytes
        return out

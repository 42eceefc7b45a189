"""Paged latent KV cache: the device layout (`PagedCache`) and the host-side page allocator (`PageAllocator`).

Device state: one array `[layers, num_pages, page_size, C]` per engine (C = kv_lora_rank + qk_rope_head_dim;
MLA's latent has no head axis, so TP ranks hold it replicated). A request owns a list of pages; its page table
maps logical page i (positions [i*Z, (i+1)*Z)) to a physical page. Page 0 is the *scratch page*: it is never
handed out, padding rows and unused page-table entries point at it, so writes of padded tokens land there and
no valid request ever reads it.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

SCRATCH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """Cache layout for `DeepseekV3.forward`: rows b write/read through `page_table_BP[b]`.

    valid_BT marks real tokens; padded tokens write to the scratch page.
    """

    page_table_BP: jax.Array
    valid_BT: jax.Array

    def update(self, state, layer: int, kv_BTC, positions_BT):
        _, _, Z, C = state.shape
        B, P = self.page_table_BP.shape
        logical_BT = positions_BT // Z
        in_range_BT = self.valid_BT & (logical_BT < P) & (positions_BT >= 0)
        page_BT = jnp.take_along_axis(self.page_table_BP, jnp.clip(logical_BT, 0, P - 1), axis=1)
        page_BT = jnp.where(in_range_BT, page_BT, SCRATCH_PAGE)
        state = state.at[layer, page_BT, positions_BT % Z].set(kv_BTC.astype(state.dtype))
        kv_BSC = state[layer][self.page_table_BP].reshape(B, P * Z, C)
        mask_BTS = jnp.arange(P * Z)[None, None, :] <= positions_BT[:, :, None]
        return state, kv_BSC, mask_BTS


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Reference-counted pages (1 .. num_pages-1; page 0 is scratch). Thread-safe.

    Invariant: free + used + leased == total (leased = held for a KV transfer that has not been acknowledged).
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least one page besides the scratch page")
        self.total = num_pages - 1
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low page ids first
        self._ref = np.zeros(num_pages, np.int32)
        self._leased: set[int] = set()
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def leased(self) -> int:
        return len(self._leased)

    @property
    def used(self) -> int:
        return int((self._ref > 0).sum()) - len(self._leased)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise OutOfPages(f"asked for {n} pages, {len(self._free)} free of {self.total}")
            pages = [self._free.pop() for _ in range(n)]
            self._ref[pages] = 1
            return pages

    def release(self, pages: list[int]) -> None:
        with self._lock:
            for p in pages:
                if p == SCRATCH_PAGE or self._ref[p] <= 0:
                    raise ValueError(f"page {p} released but not allocated")
                self._ref[p] -= 1
                if self._ref[p] == 0:
                    self._leased.discard(p)
                    self._free.append(p)

    def lease(self, pages: list[int]) -> None:
        """Mark allocated pages as held for a transfer (counted as leased, not used)."""
        with self._lock:
            self._leased.update(pages)

    def check(self) -> None:
        assert self.free + self.used + self.leased == self.total, (self.free, self.used, self.leased, self.total)
        assert len(set(self._free)) == len(self._free)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)

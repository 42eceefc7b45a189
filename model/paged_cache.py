"""The paged latent KV cache's device layout (`PagedCache`), an implementation of `model.cache.KVCache`.

State: one array `[layers, R * pages_per_rank, page_size, C]` per engine (C = kv_lora_rank + qk_rope_head_dim; MLA's
latent has no head axis, so TP ranks share it). A request owns a list of pages; its page table maps logical page i
(positions [i*Z, (i+1)*Z)) to a physical page. Which pages a request owns is the scheduler's business
(`serving.pages.PageAllocator`); this module only reads and writes them inside compiled steps.

Data-parallel attention: with R > 1 attention ranks (the mesh axes the rules map "pages" to, e.g. dp x ep), the
page axis is split over them: rank r holds global pages [r * pages_per_rank, (r + 1) * pages_per_rank), and each
request lives on one rank (its rows of a decode batch sit in that rank's slice of the batch). Reads and writes run
inside `shard_map` on the local pages, so the cache is never gathered across ranks.

Local page 0 of every rank is its *scratch page*: never handed out; padding rows and unused page-table entries
point at it, so writes of padded tokens land there and no valid request ever reads it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model.cache import BLOCKWISE_DECODE, BLOCKWISE_PREFILL, KERNEL_DECODE
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


# ---- bf16 rows on XLA:CPU: the pool holds their bits as uint16 ---------------------------------------------------
# XLA:CPU's float normalization upcasts a gather or scatter on a bf16 array to f32, converting the *whole* pool in
# and out per layer per step (latent-8e, bf16, batch 1, 16k pages: 749 ms per step, `bench.step_profile`); a bitcast
# view of a bf16 pool is a pool copy too. So the engine allocates a CPU bf16 pool as uint16 (`serving.engine.
# cache_layout`): rows are bitcast on their way in and out, nothing pool-sized is converted or copied.
def encode_rows(kv_TC, state_dtype) -> jax.Array:
    """Latent rows in the pool's storage: FP8 bytes, bf16 bits (uint16) or the float dtype itself."""
    if jnp.dtype(state_dtype) == jnp.uint8:
        return encode_fp8_rows(kv_TC)
    if jnp.dtype(state_dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(kv_TC.astype(jnp.bfloat16), jnp.uint16)
    return kv_TC.astype(state_dtype)


def read_rows(raw, dtype):
    """Cache rows as latents (dequantized when the cache is FP8 — in `dtype`; bf16 when it holds bf16 bits)."""
    if jnp.dtype(raw.dtype) == jnp.uint8:
        return decode_fp8_rows(raw, dtype)
    if jnp.dtype(raw.dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(raw, jnp.bfloat16)
    return raw


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
    return state.at[layer, page_BT, positions_BT % Z].set(encode_rows(kv_BTC, state.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """`model.cache.KVCache` layout of the serving engine: rows b write/read through `page_table_BP[b]` (global page ids).

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
    # attend block by block over only the pages the rows have (pages per block; 0 = one gathered window)
    block_pages: int = dataclasses.field(default=0, metadata=dict(static=True))
    # a batch of R x b rows is R slices, one per rank (decode); False: rows of any ranks (batched prefill)
    split_rows: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def capabilities(self) -> frozenset[str]:
        caps = set()
        if self.kernel:
            caps.add(KERNEL_DECODE)
        if self.block_pages > 0 and self.ranks == 1:
            caps.add(BLOCKWISE_PREFILL)
            caps.add(BLOCKWISE_DECODE)
        return frozenset(caps)

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
    def block_tokens(self, state) -> int:
        return self.block_pages * state.shape[2]

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
            st = read_rows(st, None)    # bf16 bits: a pool-sized bitcast — only a CPU pool (interpret mode) has them
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

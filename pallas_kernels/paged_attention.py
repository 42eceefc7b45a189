"""Paged MLA decode attention: absorbed multi-head latent attention reading the latent cache through page tables,
without materialising a gathered [B, S, C] window.

    paged_mla_decode(q_lat_BHL, q_rope_BHR, cache_LPZC, layer, page_table_BP, lengths_B, scale, impl=...)
        -> o_lat_BHL (float32)

Per row b and head h: scores over the row's first `lengths_B[b]` positions (position p lives in page
``page_table_BP[b, p // Z]`` at offset ``p % Z``), ``s_p = scale * (q_lat . c_p + q_rope . k_rope_p)`` with the
cache row ``[c_p (L) | k_rope_p (R)]`` (C = L + R = 576 for DeepSeek-V3), and ``o = softmax(s) @ c``. The caller
folds W_uk into q_lat and applies W_uv to o (absorbed MLA).

``impl``: "xla" (gather the pages, masked softmax: the reference and the CPU fallback), "pallas" (Triton kernel:
one program per (row, block of heads); it walks the row's pages, loading each [Z, L] / [Z, R] page once for the
block of heads, with an online softmax in fp32), "pallas_interpret" (the same kernel in the Pallas interpreter).
Pages past a row's length are never read, so padding entries of the page table (the scratch page) cost nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_IMPLS = ("xla", "pallas", "pallas_interpret")
_NEG = -1e30


def _xla(q_lat, q_rope, cache, layer, page_table, lengths, scale):
    B, H, L = q_lat.shape
    _, _, Z, C = cache.shape
    P = page_table.shape[1]
    kv = cache[layer][page_table].reshape(B, P * Z, C).astype(jnp.float32)
    s = (jnp.einsum("bhl,bsl->bhs", q_lat.astype(jnp.float32), kv[..., :L])
         + jnp.einsum("bhr,bsr->bhs", q_rope.astype(jnp.float32), kv[..., L:])) * scale
    valid = jnp.arange(P * Z)[None, None, :] < lengths[:, None, None]
    p = jax.nn.softmax(jnp.where(valid, s, _NEG), axis=-1)
    return jnp.einsum("bhs,bsl->bhl", p, kv[..., :L])


def _kernel(layer_ref, pt_ref, len_ref, ql_ref, qr_ref, cache_ref, o_ref, *, Z: int, L: int, R: int,
            scale: float, n_pages: int):
    """Program (b, hb): heads [hb*bh, (hb+1)*bh) of row b."""
    b = pl.program_id(0)
    layer = layer_ref[0]
    n = len_ref[b]
    q_l = ql_ref[...].astype(jnp.float32)                 # [bh, L]
    q_r = qr_ref[...].astype(jnp.float32)                 # [bh, R]
    bh = q_l.shape[0]

    def body(j, carry):
        m, l, acc = carry
        page = pt_ref[b, j]
        c = cache_ref[layer, page, :, pl.ds(0, L)].astype(jnp.float32)      # [Z, L]
        kr = cache_ref[layer, page, :, pl.ds(L, R)].astype(jnp.float32)     # [Z, R]
        s = (jnp.dot(q_l, c.T) + jnp.dot(q_r, kr.T)) * scale                # [bh, Z]
        pos = j * Z + jax.lax.broadcasted_iota(jnp.int32, (bh, Z), 1)
        s = jnp.where(pos < n, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = l * alpha + p.sum(axis=1)
        acc_new = acc * alpha[:, None] + jnp.dot(p, c)
        return m_new, l_new, acc_new

    pages = jnp.minimum((n + Z - 1) // Z, n_pages)
    init = (jnp.full((bh,), _NEG, jnp.float32), jnp.zeros((bh,), jnp.float32), jnp.zeros((bh, L), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, pages, body, init)
    o_ref[...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_h"))
def _pallas(q_lat, q_rope, cache, layer, page_table, lengths, scale: float, interpret: bool, block_h: int):
    B, H, L = q_lat.shape
    R = q_rope.shape[-1]
    _, _, Z, C = cache.shape
    bh = min(block_h, H)
    if H % bh:
        raise ValueError(f"{H} heads do not split into blocks of {bh}")
    kernel = functools.partial(_kernel, Z=Z, L=L, R=R, scale=float(scale), n_pages=page_table.shape[1])
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, H, L), jnp.float32),
        grid=(B, H // bh),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,   # layer, page table, lengths: whole
                  pl.BlockSpec((None, bh, L), lambda b, h: (b, h, 0)),
                  pl.BlockSpec((None, bh, R), lambda b, h: (b, h, 0)),
                  pl.no_block_spec],                                     # the cache: whole, read page by page
        out_specs=pl.BlockSpec((None, bh, L), lambda b, h: (b, h, 0)),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="paged_mla_decode",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), page_table.astype(jnp.int32), lengths.astype(jnp.int32),
      q_lat, q_rope, cache)


def paged_mla_decode(q_lat_BHL, q_rope_BHR, cache_LPZC, layer, page_table_BP, lengths_B, scale: float, *,
                     impl: str = "xla", block_h: int = 16):
    """Absorbed MLA decode attention over a paged latent cache (see the module docstring); float32 [B, H, L]."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    L = q_lat_BHL.shape[-1]
    if cache_LPZC.shape[-1] != L + q_rope_BHR.shape[-1]:
        raise ValueError(f"cache width {cache_LPZC.shape[-1]} != latent {L} + rope {q_rope_BHR.shape[-1]}")
    if impl == "xla":
        return _xla(q_lat_BHL, q_rope_BHR, cache_LPZC, layer, page_table_BP, lengths_B, scale)
    return _pallas(q_lat_BHL, q_rope_BHR, cache_LPZC, jnp.asarray(layer), page_table_BP, lengths_B, float(scale),
                   impl == "pallas_interpret", block_h)


__all__ = ["paged_mla_decode"]

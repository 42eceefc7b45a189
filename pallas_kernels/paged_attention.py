"""Paged MLA decode attention: absorbed multi-head latent attention reading the latent cache through page tables,
without materialising a gathered [B, S, C] window.

    paged_mla_decode(q_lat_BHL, q_rope_BHR, cache_LPZC, layer, page_table_BP, lengths_B, scale, impl=...)
        -> o_lat_BHL (float32)

Per row b and head h: scores over the row's first `lengths_B[b]` positions (position p lives in page
``page_table_BP[b, p // Z]`` at offset ``p % Z``), ``s_p = scale * (q_lat . c_p + q_rope . k_rope_p)`` with the
cache row ``[c_p (L) | k_rope_p (R)]`` (C = L + R = 576 for DeepSeek-V3), and ``o = softmax(s) @ c``. The caller
folds W_uk into q_lat and applies W_uv to o (absorbed MLA).

``impl``: "xla" (gather the pages, masked softmax: the reference and the CPU fallback), "pallas" (Triton kernel:
one program per (row, block of heads, context split); it walks its share of the row's pages, loading each
[Z, L] / [Z, R] page once for the block of heads, with bf16 tensor-core dots (the cache dtype) and an online
softmax in fp32; the splits are combined flash-decoding style, so a small batch still fills the GPU),
"pallas_interpret" (the same kernel in the Pallas interpreter). `launch_params` picks heads per program and
splits from the batch, head count and page-table width; both can be overridden.
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


def _kernel(layer_ref, pt_ref, len_ref, ql_ref, qr_ref, cache_ref, o_ref, m_ref, l_ref, *, Z: int, L: int,
            R: int, scale: float, pages_per_split: int):
    """Program (b, hb, s): heads [hb*bh, (hb+1)*bh) of row b over pages [s*pps, (s+1)*pps) of the row: the split's
    unnormalised output, running max and denominator (combined across splits by `_combine`)."""
    b, s = pl.program_id(0), pl.program_id(2)
    layer = layer_ref[0]
    n = len_ref[b]
    cdt = cache_ref.dtype                                  # dots in the cache dtype (bf16 tensor cores), f32 accum
    q_l = ql_ref[...].astype(cdt)                          # [bh, L]
    q_r = qr_ref[...].astype(cdt)                          # [bh, R]
    bh = q_l.shape[0]

    def body(j, carry):
        m, l, acc = carry
        page = pt_ref[b, j]
        c = cache_ref[layer, page, :, pl.ds(0, L)]                          # [Z, L]
        kr = cache_ref[layer, page, :, pl.ds(L, R)]                         # [Z, R]
        sc = (jnp.dot(q_l, c.T, preferred_element_type=jnp.float32)
              + jnp.dot(q_r, kr.T, preferred_element_type=jnp.float32)) * scale   # [bh, Z]
        pos = j * Z + jax.lax.broadcasted_iota(jnp.int32, (bh, Z), 1)
        sc = jnp.where(pos < n, sc, _NEG)
        m_new = jnp.maximum(m, sc.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[:, None])
        l_new = l * alpha + p.sum(axis=1)
        acc_new = acc * alpha[:, None] + jnp.dot(p.astype(cdt), c, preferred_element_type=jnp.float32)
        return m_new, l_new, acc_new

    first = s * pages_per_split
    last = jnp.minimum(first + pages_per_split, (n + Z - 1) // Z)          # pages past the length: never read
    init = (jnp.full((bh,), _NEG, jnp.float32), jnp.zeros((bh,), jnp.float32), jnp.zeros((bh, L), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first, jnp.maximum(first, last), body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _combine(o_BSHL, m_BSH, l_BSH):
    """Flash-decoding's reduction: rescale each split to the global max and normalise once."""
    mx = m_BSH.max(axis=1, keepdims=True)
    w = jnp.exp(m_BSH - mx)                                                 # empty splits: weight 0 (m = -1e30)
    den = (w * l_BSH).sum(axis=1)
    return (w[..., None] * o_BSHL).sum(axis=1) / jnp.maximum(den, 1e-30)[..., None]


def launch_params(B: int, H: int, max_pages: int, block_h: int | None = None, num_splits: int | None = None,
                  sms: int = 132) -> tuple[int, int]:
    """(block_h, num_splits): 16 heads per program (every page tile feeds a 16-row tensor-core dot, as the field's
    Triton MLA decode kernels do); the context split (flash-decoding) so that B x H/16 x splits fills ~2 waves of
    an H100/H200's SMs, each split keeping >= 4 pages so the combine stays small."""
    bh = block_h or min(16, H)
    if num_splits is None:
        programs = B * max(1, H // bh)
        num_splits = 1
        while programs * num_splits < 2 * sms and num_splits < 16 and max_pages // (2 * num_splits) >= 4:
            num_splits *= 2
    return bh, max(1, min(num_splits, max_pages))


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_h", "num_splits"))
def _pallas(q_lat, q_rope, cache, layer, page_table, lengths, scale: float, interpret: bool, block_h: int | None,
            num_splits: int | None):
    B, H, L = q_lat.shape
    R = q_rope.shape[-1]
    _, _, Z, C = cache.shape
    P = page_table.shape[1]
    bh, S = launch_params(B, H, P, block_h, num_splits)
    bh = min(bh, H)
    if H % bh:
        raise ValueError(f"{H} heads do not split into blocks of {bh}")
    pps = -(-P // S)
    kernel = functools.partial(_kernel, Z=Z, L=L, R=R, scale=float(scale), pages_per_split=pps)
    f32 = jnp.float32
    o, m, l = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, S, H, L), f32), jax.ShapeDtypeStruct((B, S, H), f32),
                   jax.ShapeDtypeStruct((B, S, H), f32)),
        grid=(B, H // bh, S),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,   # layer, page table, lengths: whole
                  pl.BlockSpec((None, bh, L), lambda b, h, s: (b, h, 0)),
                  pl.BlockSpec((None, bh, R), lambda b, h, s: (b, h, 0)),
                  pl.no_block_spec],                                     # the cache: whole, read page by page
        out_specs=(pl.BlockSpec((None, None, bh, L), lambda b, h, s: (b, s, h, 0)),
                   pl.BlockSpec((None, None, bh), lambda b, h, s: (b, s, h)),
                   pl.BlockSpec((None, None, bh), lambda b, h, s: (b, s, h))),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="paged_mla_decode",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), page_table.astype(jnp.int32), lengths.astype(jnp.int32),
      q_lat, q_rope, cache)
    return _combine(o, m, l)


def paged_mla_decode(q_lat_BHL, q_rope_BHR, cache_LPZC, layer, page_table_BP, lengths_B, scale: float, *,
                     impl: str = "xla", block_h: int | None = None, num_splits: int | None = None):
    """Absorbed MLA decode attention over a paged latent cache (see the module docstring); float32 [B, H, L]."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    L = q_lat_BHL.shape[-1]
    if cache_LPZC.shape[-1] != L + q_rope_BHR.shape[-1]:
        raise ValueError(f"cache width {cache_LPZC.shape[-1]} != latent {L} + rope {q_rope_BHR.shape[-1]}")
    if impl == "xla":
        return _xla(q_lat_BHL, q_rope_BHR, cache_LPZC, layer, page_table_BP, lengths_B, scale)
    return _pallas(q_lat_BHL, q_rope_BHR, cache_LPZC, jnp.asarray(layer), page_table_BP, lengths_B, float(scale),
                   impl == "pallas_interpret", block_h, num_splits)


__all__ = ["paged_mla_decode", "launch_params"]

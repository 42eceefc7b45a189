"""Multi-head Latent Attention (MLA) with two paths over the same latent keys.

* naive    — decompress the latent `c` to per-head K/V with `kv_b_proj`, then ordinary attention (prefill, the
             teacher-forced forward);
* absorbed — fold `kv_b_proj` into the query (q·W_uk) and the output (·W_uv), so attention reads only the latent
             cache of `kv_lora_rank + qk_rope_head_dim` values per token (decode).

The layer does not own a cache. It produces each new token's latent (`latents`), the caller writes it wherever
its cache lives (contiguous, paged, none) and hands back the keys to attend to (`attend`). That keeps one
attention implementation for every cache layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import RMSNorm, linear, param, rms_norm
from model.runtime import DEFAULT_RUNTIME
from model.rope import apply_rope

_NEG_INF = -1e30  # finite: a fully-masked row (padding) gives a uniform softmax instead of NaN



def _online_softmax_block(s_BHTS, m_BHT, j, block_len: int, positions_BT):
    """One key block of an online softmax: scores of keys past each query's position masked, the running max
    updated. Returns (new max, the factor rescaling what was accumulated, this block's unnormalized probs)."""
    key_S = j * block_len + jnp.arange(block_len)
    s_BHTS = jnp.where(key_S[None, None, None, :] <= positions_BT[:, None, :, None], s_BHTS, _NEG_INF)
    m_new = jnp.maximum(m_BHT, s_BHTS.max(-1))
    return m_new, jnp.exp(m_BHT - m_new), jnp.exp(s_BHTS - m_new[..., None])

class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        K, R, V, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.cfg = cfg
        if cfg.q_lora_rank:
            Q = cfg.q_lora_rank
            # HF's q_a_proj [D, Q] and kv_a_proj_with_mqa [D, L + R], concatenated at load: both read the same
            # input, so one matmul instead of two per layer
            self.qkv_a_proj = param(rngs, (D, Q + L + R), ("embed", "qkv_a"), dtype)
            self.q_a_layernorm = RMSNorm(Q, "q_lora", 1e-6, rngs=rngs, dtype=dtype)
            self.q_b_proj = param(rngs, (Q, H, K + R), ("q_lora", "heads", "qk_head"), dtype)
        else:
            self.q_proj = param(rngs, (D, H, K + R), ("embed", "heads", "qk_head"), dtype)
            self.kv_a_proj_with_mqa = param(rngs, (D, L + R), ("embed", "kv_latent"), dtype)
        self.kv_a_layernorm = RMSNorm(L, "kv_lora", 1e-6, rngs=rngs, dtype=dtype)
        # kv_b_proj (HF [H*(K+V), L]) as its two per-head halves, head-major: see below
        self.w_uk = param(rngs, (H, L, K), ("heads", "kv_lora", "qk_head"), dtype)
        self.w_uv = param(rngs, (H, L, V), ("heads", "kv_lora", "v_head"), dtype)
        self.o_proj = param(rngs, (H, V, D), ("heads", "v_head", "embed"), dtype)

    # Weights may be block-FP8 (`Fp8Tensor`, DeepSeek's release format kept on device). The projections run as
    # matmuls (`linear`: W8A16 kernels, on local shards under TP), the per-head q_b / q / o projections through
    # their flattened matrix view. kv_b_proj is kept as W_uk [H, L, K] and W_uv [H, L, V], plain arrays in the
    # model dtype (dequantized once at load, not every step): each head's block is contiguous, so the per-head
    # einsums are batched dots with the batch axis leading and no operand copy. As one [L, H, K+V] weight, XLA
    # copied a transposed, sliced W_uk and W_uv every step (XLA:CPU latent-8e batch 1: 11 of 15 ms per step,
    # `bench.step_profile`).
    def absorb_weights(self, dtype) -> tuple[jax.Array, jax.Array]:
        """W_uk [H, L, K] and W_uv [H, L, V] in `dtype`."""
        return self.w_uk[...].astype(dtype), self.w_uv[...].astype(dtype)

    def project(self, x_BTD, cos, sin, runtime=DEFAULT_RUNTIME) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q_nope [B,T,H,K], roped q_rope [B,T,H,R], and what the cache stores per token: [normed kv latent (L) |
        roped shared key (R)] = [B,T,C]."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, L = cfg.num_attention_heads, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            a_BTX = linear(x_BTD, self.qkv_a_proj, runtime)
            q_BTQ, kv_BTX = self.q_a_layernorm(a_BTX[..., : cfg.q_lora_rank]), a_BTX[..., cfg.q_lora_rank:]
            q_BTHX = linear(q_BTQ, self.q_b_proj, runtime).reshape(B, T, H, cfg.qk_head_dim)
        else:
            q_BTHX = linear(x_BTD, self.q_proj, runtime).reshape(B, T, H, cfg.qk_head_dim)
            kv_BTX = linear(x_BTD, self.kv_a_proj_with_mqa, runtime)
        q_nope_BTHK = q_BTHX[..., : cfg.qk_nope_head_dim]
        q_rope_BTHR = apply_rope(q_BTHX[..., cfg.qk_nope_head_dim:], cos, sin, cfg.rope_interleave)
        c_BTL = rms_norm(kv_BTX[..., :L], self.kv_a_layernorm.weight[...], self.kv_a_layernorm.eps)
        k_rope_BTR = apply_rope(kv_BTX[..., L:], cos, sin, cfg.rope_interleave)
        return q_nope_BTHK, q_rope_BTHR, jnp.concatenate([c_BTL, k_rope_BTR], axis=-1)

    def attend_paged(self, q_nope_BTHK, q_rope_BTHR, cache, state, layer: int, positions_BT,
                     runtime=DEFAULT_RUNTIME) -> jax.Array:
        """Absorbed attention whose latent part runs in the cache layout's paged kernel (`cache.attend_absorbed`:
        pages read through the page table, no gathered window); returns [B,T,D]."""
        cfg = self.cfg
        w_uk_HLK, w_uv_HLV = self.absorb_weights(q_nope_BTHK.dtype)
        q_lat_BTHL = jnp.einsum("bthk,hlk->bthl", q_nope_BTHK, w_uk_HLK)
        o_lat_BTHL = cache.attend_absorbed(state, layer, q_lat_BTHL, q_rope_BTHR, positions_BT, cfg.softmax_scale)
        o_BTHV = jnp.einsum("bthl,hlv->bthv", o_lat_BTHL.astype(q_nope_BTHK.dtype), w_uv_HLV)
        B, T, H, V = o_BTHV.shape
        return linear(o_BTHV.reshape(B, T, H * V), self.o_proj, runtime, k_ndim=2)

    def attend_blockwise(self, q_nope_BTHK, q_rope_BTHR, read_block, block_len: int, positions_BT,
                         runtime=DEFAULT_RUNTIME) -> jax.Array:
        """Naive (prefill) attention over key blocks `read_block(j) -> [B, block_len, C]` (block j holds key
        positions [j * block_len, (j + 1) * block_len)), flash-style: an online softmax in f32 over only the
        blocks the queries reach (a dynamic trip count), so memory is O(T x block) and work grows with the
        context actually present, not with the cache window. Returns [B,T,D]."""
        cfg = self.cfg
        L = cfg.kv_lora_rank
        B, T, H, _ = q_nope_BTHK.shape
        dtype = q_nope_BTHK.dtype
        w_uk_HLK, w_uv_HLV = self.absorb_weights(dtype)
        V = w_uv_HLV.shape[-1]
        n_blocks = (jnp.max(positions_BT) + block_len) // block_len

        def body(j, carry):
            m_BHT, l_BHT, acc_BTHV = carry
            kv_BSC = read_block(j)
            c_BSL, k_rope_BSR = kv_BSC[..., :L].astype(dtype), kv_BSC[..., L:].astype(dtype)
            k_nope_BSHK = jnp.einsum("bsl,hlk->bshk", c_BSL, w_uk_HLK)
            v_BSHV = jnp.einsum("bsl,hlv->bshv", c_BSL, w_uv_HLV)
            s_BHTS = (jnp.einsum("bthk,bshk->bhts", q_nope_BTHK, k_nope_BSHK)
                      + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)).astype(jnp.float32) * cfg.softmax_scale
            m_new, alpha, p_BHTS = _online_softmax_block(s_BHTS, m_BHT, j, block_len, positions_BT)
            l_new = l_BHT * alpha + p_BHTS.sum(-1)
            pv_BTHV = jnp.einsum("bhts,bshv->bhtv", p_BHTS.astype(dtype), v_BSHV).transpose(0, 2, 1, 3).astype(
                jnp.float32)
            return m_new, l_new, acc_BTHV * alpha.transpose(0, 2, 1)[..., None] + pv_BTHV

        init = (jnp.full((B, H, T), _NEG_INF, jnp.float32), jnp.zeros((B, H, T), jnp.float32),
                jnp.zeros((B, T, H, V), jnp.float32))
        _, l_BHT, acc_BTHV = jax.lax.fori_loop(0, n_blocks, body, init)
        o_BTHV = (acc_BTHV / jnp.maximum(l_BHT, 1e-30).transpose(0, 2, 1)[..., None]).astype(dtype)
        return linear(o_BTHV.reshape(B, T, H * V), self.o_proj, runtime, k_ndim=2)

    def attend_absorbed_blockwise(self, q_nope_BTHK, q_rope_BTHR, read_block, block_len: int, positions_BT,
                                  runtime=DEFAULT_RUNTIME) -> jax.Array:
        """Absorbed (decode) attention over latent key blocks `read_block(j) -> [B, block_len, C]`, online softmax
        in f32 over only the blocks the queries reach (a dynamic trip count: max position // block_len + 1), so a
        step costs the context present — not the executable's page window, not max_model_len. Returns [B,T,D]."""
        cfg = self.cfg
        L = cfg.kv_lora_rank
        B, T, H, _ = q_nope_BTHK.shape
        dtype = q_nope_BTHK.dtype
        w_uk_HLK, w_uv_HLV = self.absorb_weights(dtype)
        q_lat_BTHL = jnp.einsum("bthk,hlk->bthl", q_nope_BTHK, w_uk_HLK)
        # the latent and rope queries as one [L + R] query against the block's whole cache rows: one score dot, and
        # the block is used as read (slicing its latent part would copy it: 17 MB per layer at batch 64, L = 512)
        q_BTHC = jnp.concatenate([q_lat_BTHL, q_rope_BTHR.astype(q_lat_BTHL.dtype)], axis=-1)
        C = q_BTHC.shape[-1]
        n_blocks = (jnp.max(positions_BT) + block_len) // block_len

        def body(j, carry):
            m_BHT, l_BHT, acc_BHTC = carry
            kv_BSC = read_block(j).astype(dtype)
            s_BHTS = jnp.einsum("bthc,bsc->bhts", q_BTHC, kv_BSC).astype(jnp.float32) * cfg.softmax_scale
            m_new, alpha, p_BHTS = _online_softmax_block(s_BHTS, m_BHT, j, block_len, positions_BT)
            # (b, h, t) output order: see `attend` on XLA:CPU's strided batched dot; the R rope columns of the
            # output ride along (R / L more work than slicing c, no copy) and are dropped at the end
            pv_BHTC = jnp.einsum("bhts,bsc->bhtc", p_BHTS.astype(dtype), kv_BSC).astype(jnp.float32)
            return m_new, l_BHT * alpha + p_BHTS.sum(-1), acc_BHTC * alpha[..., None] + pv_BHTC

        init = (jnp.full((B, H, T), _NEG_INF, jnp.float32), jnp.zeros((B, H, T), jnp.float32),
                jnp.zeros((B, H, T, C), jnp.float32))
        _, l_BHT, acc_BHTC = jax.lax.fori_loop(0, n_blocks, body, init)
        o_lat_BHTL = (acc_BHTC[..., :L] / jnp.maximum(l_BHT, 1e-30)[..., None]).astype(dtype)
        # heads leading (a copy of B*T*H*L values), so the value absorption is H plain [B*T, L] x [L, V] matmuls:
        # XLA:CPU ran "bthl,hlv->bthv" as a slow strided batched dot (latent-8e batch 16: 0.74 -> 0.20 ms a layer)
        o_HML = o_lat_BHTL.transpose(1, 0, 2, 3).reshape(H, B * T, L)
        o_MHV = jnp.einsum("hml,hlv->hmv", o_HML, w_uv_HLV).transpose(1, 0, 2)
        return linear(o_MHV.reshape(B, T, H * o_MHV.shape[-1]), self.o_proj, runtime, k_ndim=2)

    def attend(self, q_nope_BTHK, q_rope_BTHR, kv_BSC, mask_BTS, *, absorbed: bool,
               runtime=DEFAULT_RUNTIME) -> jax.Array:
        """Attention of the queries over latent keys kv_BSC where mask_BTS is true; returns [B,T,D]."""
        cfg = self.cfg
        L = cfg.kv_lora_rank
        c_BSL, k_rope_BSR = kv_BSC[..., :L], kv_BSC[..., L:]
        w_uk_HLK, w_uv_HLV = self.absorb_weights(q_nope_BTHK.dtype)
        rope_scores = jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)
        if absorbed:
            q_lat_BTHL = jnp.einsum("bthk,hlk->bthl", q_nope_BTHK, w_uk_HLK)
            scores_BHTS = jnp.einsum("bthl,bsl->bhts", q_lat_BTHL, c_BSL) + rope_scores
        else:
            k_nope_BSHK = jnp.einsum("bsl,hlk->bshk", c_BSL, w_uk_HLK)
            scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_nope_BTHK, k_nope_BSHK) + rope_scores
        scores_BHTS = scores_BHTS.astype(jnp.float32) * cfg.softmax_scale
        scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, _NEG_INF)
        probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(kv_BSC.dtype)
        if absorbed:
            # output in the probabilities' (b, h, t) order, then transposed: XLA:CPU runs "bhts,bsl->bthl" as a
            # slow batched dot with a strided output (6x slower at batch 64; bench/decode_grid.py)
            o_lat_BTHL = jnp.einsum("bhts,bsl->bhtl", probs_BHTS, c_BSL).transpose(0, 2, 1, 3)
            o_BTHV = jnp.einsum("bthl,hlv->bthv", o_lat_BTHL, w_uv_HLV)
        else:
            v_BSHV = jnp.einsum("bsl,hlv->bshv", c_BSL, w_uv_HLV)
            o_BTHV = jnp.einsum("bhts,bshv->bhtv", probs_BHTS, v_BSHV).transpose(0, 2, 1, 3)
        B, T, H, V = o_BTHV.shape
        return linear(o_BTHV.reshape(B, T, H * V), self.o_proj, runtime, k_ndim=2)

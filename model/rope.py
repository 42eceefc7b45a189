"""Rotary position embedding with DeepSeek's yarn scaling, numerically as the HF reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig, yarn_get_mscale


def inv_freq_and_attention_factor(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [R/2] (float32) and the factor that multiplies cos/sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    rs = cfg.rope_scaling_dict
    if rs is None or rs.get("rope_type", "default") == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0

    factor = cfg.yarn_factor
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    orig_max = rs["original_max_position_embeddings"]

    def correction_dim(num_rotations):
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + [R/2], float32, already multiplied by the yarn attention factor."""
    inv_freq, attn_factor = inv_freq_and_attention_factor(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs) * attn_factor, jnp.sin(freqs) * attn_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """Rotate the last axis of `x` [..., T, (H,) R] by cos/sin [..., T, R/2].

    With `interleave` the input pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout); the output is always in the
    half-split layout [rotated evens | rotated odds], exactly as the HF reference. q and k use the same layout, so
    their dot product is that of the interleaved rotation.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    if x.ndim == cos.ndim + 1:  # a head axis sits between T and R
        cos, sin = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

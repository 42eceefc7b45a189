"""The model's cache contract (`KVCache`) and the two layouts that need no serving machinery.

A decoder layer produces each new token's latent and asks the cache layout to store it and show it the keys. Every
layout implements `update(state, layer, kv_BTC, positions_BT) -> (state, kv_BSC, mask_BTS)`: write the new tokens'
latents, return the keys the queries attend to and which of them each query may see. `state` is a plain array (a
pytree leaf), so it can be donated to and returned from compiled steps.

A layout may declare *capabilities* (`capabilities`, a frozenset); each names the extra methods it then provides and
the path the layer takes instead of `update`:

* `KERNEL_DECODE`     — absorbed decode reads the cache itself: `write(state, layer, kv_BTC, positions_BT) -> state`,
                        then `attend_absorbed(state, layer, q_lat_BTHL, q_rope_BTHR, positions_BT, scale)` (the paged
                        MLA decode kernel reads page by page; nothing is gathered).
* `BLOCKWISE_PREFILL` — prefill attends block by block over only what the rows reach: `write(...)`, then
                        `read_block(state, layer, j, dtype) -> [B, block_tokens, C]` and `block_tokens(state)`.
* `BLOCKWISE_DECODE`  — absorbed decode does the same (same methods): a step costs the context present, not the
                        executable's page window.

Layouts here:
* `NoCache`         — keys are the current tokens themselves (teacher-forced forward, training).
* `ContiguousCache` — state [layers, B, S, C]; token at absolute position p of row b lives at [:, b, p].
* `model.paged_cache.PagedCache` — the serving engine's paged layout (pages owned by the scheduler).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from model.config import ModelConfig

KERNEL_DECODE = "kernel_decode"
BLOCKWISE_PREFILL = "blockwise_prefill"
BLOCKWISE_DECODE = "blockwise_decode"
_METHODS = {KERNEL_DECODE: ("write", "attend_absorbed"), BLOCKWISE_PREFILL: ("write", "read_block", "block_tokens"),
            BLOCKWISE_DECODE: ("write", "read_block", "block_tokens")}


@runtime_checkable
class KVCache(Protocol):
    """What `DeepseekV3.forward` needs from a cache layout (see the module docstring for the capabilities)."""

    @property
    def capabilities(self) -> frozenset[str]: ...

    def update(self, state, layer: int, kv_BTC, positions_BT): ...


def check_layout(cache) -> frozenset[str]:
    """The layout's capabilities, after checking it implements the contract (a clear error otherwise)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"{type(cache).__name__} is not a model.cache.KVCache: it needs `capabilities` and `update`")
    caps = frozenset(cache.capabilities)
    for cap in caps:
        if cap not in _METHODS:
            raise TypeError(f"{type(cache).__name__} declares unknown capability {cap!r}; known: {sorted(_METHODS)}")
        missing = [m for m in _METHODS[cap] if not callable(getattr(cache, m, None))]
        if missing:
            raise TypeError(f"{type(cache).__name__} declares {cap!r} but has no {', '.join(missing)}")
    return caps


@dataclasses.dataclass(frozen=True)
class NoCache:
    capabilities = frozenset()

    def update(self, state, layer: int, kv_BTC, positions_BT):
        del layer
        mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
        return state, kv_BTC, mask_BTS


@dataclasses.dataclass(frozen=True)
class ContiguousCache:
    """One latent row per (layer, batch row, position); positions past `max_len` are dropped on write."""

    capabilities = frozenset()

    def update(self, state, layer: int, kv_BTC, positions_BT):
        B = kv_BTC.shape[0]
        S = state.shape[2]
        rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], positions_BT.shape)
        state = state.at[layer, rows_BT, positions_BT].set(kv_BTC.astype(state.dtype), mode="drop")
        mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
        return state, state[layer], mask_BTS

    @staticmethod
    def init(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> jax.Array:
        return jnp.zeros((cfg.num_hidden_layers, batch, max_len, cfg.cache_width), dtype)
